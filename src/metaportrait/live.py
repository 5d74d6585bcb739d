"""Live animation: driving frames consumed as they arrive, the newest first, never falling behind.

::

    from metaportrait.live import FileSource, run_live
    report = run_live(animator, portrait, FileSource("talk.mp4"), on_frame=lambda frame, repeats: ...)

A *frame source* runs in its own thread and offers frames at their own pace (a camera as it delivers them, a file
at its frame rate). The consumer takes the newest offered frame; a frame that is replaced before it was taken is
dropped. Each taken frame goes through the one inference pipeline (`metaportrait.pipeline.Animator` with the
``"running"`` reference, batch 1) and comes out with its latency: output time minus the time it was offered.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaportrait.errors import InputError


class _Mailbox:
    """One slot holding the newest ``(frame, offered time, index)``; replacing an untaken frame counts a drop."""

    def __init__(self):
        self._condition = threading.Condition()
        self._item: tuple[np.ndarray, float, int] | None = None
        self._closed = False
        self.dropped = 0
        self.error: BaseException | None = None

    def put(self, frame: np.ndarray, index: int) -> bool:
        """Offer a frame; False once the consumer has closed the box (the source should stop)."""
        with self._condition:
            if self._closed:
                return False
            if self._item is not None:
                self.dropped += 1
            self._item = (frame, time.perf_counter(), index)
            self._condition.notify()
            return True

    def close(self, error: BaseException | None = None) -> None:
        with self._condition:
            self._closed, self.error = True, error
            self._condition.notify()

    def take(self) -> tuple[np.ndarray, float, int] | None:
        """The newest frame, waiting for one; None once the source has ended and everything was taken."""
        with self._condition:
            while self._item is None and not self._closed:
                self._condition.wait()
            item, self._item = self._item, None
            return item


class FileSource:
    """A video file played in real time: frame ``i`` is offered at ``start + i / fps``.

    Raises:
        InputError: as `metaportrait.io.video.VideoReader` (missing file, not a video, ...), when opened.
    """

    def __init__(self, path: str | Path):
        from metaportrait.io.video import VideoReader

        self.name = Path(path)
        self._reader = VideoReader(path)  # opened now: a bad file fails before the model loads
        self.fps = self._reader.fps

    def frames(self) -> Iterator[np.ndarray]:
        start = time.perf_counter()
        with self._reader as reader:
            for index, frame in enumerate(reader):
                delay = start + index / self.fps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                yield frame


class CameraSource:
    """A camera through OpenCV (``cv2.VideoCapture(index)``), RGB frames as the camera delivers them.

    Raises:
        InputError: the camera does not open or delivers no frame.
    """

    def __init__(self, index: int, max_frames: int | None = None):
        import cv2

        self.name = Path(f"camera {index}")
        self._capture = cv2.VideoCapture(index)
        if not self._capture.isOpened():
            raise InputError(self.name, "could not be opened (no such camera, or no access to it)")
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS)) or 25.0
        self._max_frames = max_frames

    def frames(self) -> Iterator[np.ndarray]:
        import cv2

        count = 0
        try:
            while self._max_frames is None or count < self._max_frames:
                ok, frame = self._capture.read()
                if not ok:
                    if count == 0:
                        raise InputError(self.name, "delivered no frame")
                    return
                count += 1
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            self._capture.release()


@dataclass
class LiveReport:
    """What a live run achieved. Latencies are from a frame being offered to its output frame being ready."""

    offered: int  # frames the source offered
    processed: int  # frames animated
    dropped: int  # frames replaced by a newer one before the animator took them
    seconds: float
    fps: float  # processed frames per second
    latency_p50_ms: float
    latency_p95_ms: float
    reference_changes: int  # how often the running neutral reference moved

    def to_dict(self) -> dict:
        return {key: (round(value, 2) if isinstance(value, float) else value) for key, value in vars(self).items()}


def run_live(animator, portrait: np.ndarray, source: FileSource | CameraSource,
             on_frame: Callable[[np.ndarray, int], None], *, expression_scale: float = 1.0,
             paste_back: bool = True, portrait_name: str | Path = "<source>") -> LiveReport:
    """Animate ``portrait`` live from ``source``; calls ``on_frame(frame, repeats)`` for every output frame.

    ``repeats`` is how many source frames the output frame stands for (1 + the frames dropped before it), so a
    writer can repeat it and keep the output in time with the input. The animator runs with batch size 1.

    Raises:
        InputError / NoFaceError: as `Animator.__call__`; also an error raised inside the source's thread.
    """
    mailbox = _Mailbox()
    offered = 0

    def produce() -> None:
        nonlocal offered
        try:
            for index, frame in enumerate(source.frames()):
                if not mailbox.put(frame, index):
                    return
                offered = index + 1
            mailbox.close()
        except BaseException as error:  # handed to the consumer, which raises it
            mailbox.close(error)

    pending: deque[tuple[float, int]] = deque()  # (offered time, index) of frames handed to the animator

    def consume() -> Iterator[np.ndarray]:
        while (item := mailbox.take()) is not None:
            frame, offered_at, index = item
            pending.append((offered_at, index))
            yield frame
        if mailbox.error is not None:  # the source failed: its error, not "no frames"
            raise mailbox.error

    animator.batch_size = 1
    # Frames are taken from the source as the animator asks for them, newest first; tracking them ahead of the
    # generator would add latency, so the steps run one after another here (the source has its own thread).
    animator.overlap = False
    thread = threading.Thread(target=produce, name="metaportrait-live-source", daemon=True)
    start = time.perf_counter()
    thread.start()
    latencies, last_index = [], -1
    try:
        for frame in animator(portrait, consume(), reference="running", expression_scale=expression_scale,
                              paste_back=paste_back, driving_fps=source.fps, source_name=portrait_name,
                              driving_name=source.name):
            offered_at, index = pending.popleft()
            latencies.append(time.perf_counter() - offered_at)
            on_frame(frame, index - last_index)
            last_index = index
    except KeyboardInterrupt:  # the way to end a camera run: keep what was made
        pass
    finally:
        mailbox.close()
    thread.join(timeout=5)
    if mailbox.error is not None:
        raise mailbox.error
    seconds = time.perf_counter() - start
    milliseconds = 1000 * np.asarray(latencies or [np.nan])
    return LiveReport(offered=offered, processed=len(latencies), dropped=mailbox.dropped, seconds=seconds,
                      fps=len(latencies) / seconds, latency_p50_ms=float(np.percentile(milliseconds, 50)),
                      latency_p95_ms=float(np.percentile(milliseconds, 95)),
                      reference_changes=animator.stats.reference_changes)
