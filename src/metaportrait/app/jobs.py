"""What the web app does, without the web: checking uploads, animating, editing, and the run's file folder.

Every function here is plain Python over `metaportrait.pipeline.Animator`, so tests call them directly. Uploads
arrive as paths of files the web framework saved; their names are never used, only their bytes. Problems with
an upload raise `InputError` naming the upload's role (``portrait``, ``driving video``) instead of its path,
because the path means nothing to the person in front of the page.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from metaportrait.data.drawing import draw_landmark_image
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.demo_motion import DEMO_FPS, DEMO_SECONDS, scripted_motion
from metaportrait.errors import InputError
from metaportrait.eval.report import label_tile, markdown_table
from metaportrait.io.image import read_image
from metaportrait.io.video import VideoInfo, VideoReader, VideoWriter, even_size, probe
from metaportrait.motion import Controls
from metaportrait.pipeline import Animator, Motion

PORTRAIT = "portrait"  # the names uploads go by in messages
DRIVING = "driving video"
SIDE_BY_SIDE_HEIGHT = 256  # pixels: each tile of the side-by-side video is scaled to this height
# Longest side of a portrait, in pixels: every result frame has the portrait's size (a 12-megapixel phone photo
# is 4032 x 3024); larger ones are refused rather than resized behind the user's back.
MAX_PORTRAIT_SIDE = 4096


@dataclass(frozen=True)
class Limits:
    """What the app accepts (`metaportrait app --max-upload-mb --max-seconds`)."""

    max_upload_bytes: int = 50 * 2**20
    max_seconds: float = 60.0  # longest driving video

    def __post_init__(self):
        if self.max_upload_bytes < 1 or not self.max_seconds > 0:
            raise ValueError(f"limits must be positive, got {self}")


class RunFolder:
    """The app's temporary folder for one run: the framework's uploads and every result live under it.

    Result files are named by a counter (``0003-result.mp4``), never after an upload. `close` removes the folder.
    """

    def __init__(self, parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix="metaportrait-app-", dir=parent))
        self.results = self.path / "results"
        self.results.mkdir()
        self.uploads = self.path / "uploads"  # given to the web framework as its temporary folder
        self.uploads.mkdir()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def new_job(self) -> int:
        """A number for the next job's files, unique in this run (jobs of several browser tabs may overlap)."""
        with self._lock:
            return next(self._counter)

    def result_path(self, job: int, name: str) -> Path:
        """``results/<job>-<name>``; ``name`` is one of the app's own, such as ``result.mp4``."""
        return self.results / f"{job:04d}-{name}"

    def close(self) -> None:
        """Remove the folder and everything in it. Safe to call twice."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True, eq=False)  # compared by identity: fields are arrays
class Portrait:
    """A checked portrait: the image and its face's landmarks (measured once, reused by every job)."""

    image: np.ndarray = field(repr=False)  # uint8 (H, W, 3) RGB
    landmarks: np.ndarray = field(repr=False)  # float32 (478, 2) pixels of `image`


def _checked_upload(upload: str | Path | None, role: str, limits: Limits) -> Path:
    """The upload's path, after checking that there is one and that it is not too large."""
    if upload is None:
        raise InputError(role, "nothing uploaded")
    path = Path(upload)
    if not path.is_file():
        raise InputError(role, "the upload is missing; upload it again")
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise InputError(role, f"the file is {size / 2**20:.1f} MB; this app takes at most "
                               f"{limits.max_upload_bytes / 2**20:g} MB")  # fmt: skip
    return path


def load_portrait(upload: str | Path | None, limits: Limits) -> Portrait:
    """Decode an uploaded portrait and find its face.

    Raises:
        InputError: (naming ``portrait``) nothing uploaded, too large (file or image), not an image, or no face.
    """
    path = _checked_upload(upload, PORTRAIT, limits)
    try:
        image = read_image(path)
    except InputError as error:
        raise InputError(PORTRAIT, error.problem) from None
    height, width = image.shape[:2]
    if max(height, width) > MAX_PORTRAIT_SIDE:
        raise InputError(PORTRAIT, f"the image is {width} x {height} pixels; this app takes at most "
                                   f"{MAX_PORTRAIT_SIDE} on the longer side (scale it down)")  # fmt: skip
    return portrait_of(image)


def portrait_of(image: np.ndarray) -> Portrait:
    """A `Portrait` of a decoded ``uint8`` ``(H, W, 3)`` RGB image. Raises `NoFaceError` (naming ``portrait``)."""
    return Portrait(image, landmarks_of_image(image, PORTRAIT))


def check_driving(upload: str | Path | None, limits: Limits) -> VideoInfo:
    """Check an uploaded driving video before any work: present, small enough, a video, short enough.

    Raises:
        InputError: (naming ``driving video``) the problem.
    """
    return check_video(upload, DRIVING, limits)


def check_video(upload: str | Path | None, role: str, limits: Limits) -> VideoInfo:
    """`check_driving` for any uploaded video; messages name ``role``."""
    path = _checked_upload(upload, role, limits)
    try:
        info = probe(path)
    except InputError as error:
        raise InputError(role, error.problem) from None
    seconds = info.duration or info.frame_count / info.fps
    if seconds > limits.max_seconds:
        raise InputError(role, f"it is {seconds:.1f} s long; this app takes at most {limits.max_seconds:g} s")
    return info


@dataclass(frozen=True)
class AnimateOptions:
    """The Animate tab's settings (see `Animator.__call__`)."""

    motion: Motion = "relative"  # ignored by the scripted motion, which is made from the portrait itself
    paste_back: bool = True
    controls: Controls = Controls()


@dataclass(frozen=True)
class AnimateResult:
    """A finished animation: the video, the side-by-side video ([driving | result]), and counts."""

    video: Path
    side_by_side: Path
    frames: int
    seconds: float  # wall time of the animation
    lost_frames: int  # driving frames without a detected face

    def summary(self) -> str:
        lost = f", face lost in {self.lost_frames} driving frames" if self.lost_frames else ""
        return f"{self.frames} frames in {self.seconds:.1f} s ({self.frames / self.seconds:.1f} frames/s){lost}"


class Cancelled(Exception):
    """An `AnimateJob` stopped by `AnimateJob.cancel`."""


class AnimateJob:
    """One animation, checked when made and run by iterating `run`.

    ``driving=None`` uses the built-in scripted motion (`metaportrait.demo_motion`: talking, blinks, a head turn
    and a nod, 4 s). Either way the result is at most ``limits.max_seconds`` long. `run` yields the number of
    frames done after each frame; afterwards `result` holds the `AnimateResult`. `cancel` (from another thread)
    stops it at the next frame read or written, also while the driving video is being tracked (the animator
    tracks the whole clip before its first frame); a stopped job, like one whose `run` is closed early, leaves no
    result file behind.

    Raises:
        InputError: a bad driving video (now), or no face in any of its frames (from `run`, before any frame).
    """

    def __init__(self, animator: Animator, portrait: Portrait, driving: str | Path | None, options: AnimateOptions,
                 folder: RunFolder, limits: Limits):
        self.animator = animator
        self.portrait = portrait
        self.options = options
        self.driving = None if driving is None else Path(driving)
        if self.driving is None:
            self.fps = DEMO_FPS
            self.total = min(round(DEMO_FPS * DEMO_SECONDS), math.ceil(limits.max_seconds * DEMO_FPS))
            self.has_audio = False
        else:
            info = check_driving(driving, limits)
            self.fps = info.fps
            # At most max_seconds of frames, even if the container misstates its length.
            self.total = min(info.frame_count, math.ceil(limits.max_seconds * info.fps))
            self.has_audio = info.has_audio
        job = folder.new_job()
        self.video_path = folder.result_path(job, "result.mp4")
        self.side_by_side_path = folder.result_path(job, "side_by_side.mp4")
        self.result: AnimateResult | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the job to stop; `run` then raises `Cancelled`. Safe from any thread, at any time."""
        self._cancelled.set()

    def run(self, on_read: Callable[[int], None] | None = None) -> Iterator[int]:
        """Animate and write both videos; yields the frames done so far after each frame.

        Args:
            on_read: called with the number of driving frames read so far, after each (the tracking before the
                first result frame reads the whole clip).

        Raises:
            Cancelled: `cancel` was called.
        """
        portrait, options = self.portrait, self.options
        if self.driving is None:
            targets = scripted_motion(portrait.landmarks, self.total, self.fps)  # (T, 478, 2) portrait pixels
            frames = self.animator.animate_landmarks(portrait.image, targets, paste_back=options.paste_back,
                                                     controls=options.controls, source_name=PORTRAIT,
                                                     source_landmarks=portrait.landmarks)  # fmt: skip
            height, width = portrait.image.shape[:2]
            beside = (draw_landmark_image(target, height, width) for target in targets)
            yield from self._write(frames, beside, "motion", audio=None)
            return
        # The animator reads the clip ahead of its results; a second reader gives the side-by-side its frames in
        # step with them, so that no frame is held in memory meanwhile.
        with VideoReader(self.driving) as reader, VideoReader(self.driving) as again:
            driving = self._watched(itertools.islice(reader, self.total), on_read)
            frames = self.animator(portrait.image, driving, motion=options.motion, paste_back=options.paste_back,
                                   controls=options.controls, driving_fps=self.fps, source_name=PORTRAIT,
                                   driving_name=DRIVING, source_landmarks=portrait.landmarks)  # fmt: skip
            beside = itertools.islice(again, self.total)
            with contextlib.closing(frames):  # its background threads end before the readers close
                yield from self._write(frames, beside, "driving", audio=self.driving if self.has_audio else None)

    def _watched(self, frames: Iterable[np.ndarray], on_read: Callable[[int], None] | None) -> Iterator[np.ndarray]:
        """``frames``, stopping with `Cancelled` once the job is cancelled, and reporting each frame read."""
        for count, frame in enumerate(frames, start=1):
            if self._cancelled.is_set():
                raise Cancelled
            if on_read is not None:
                on_read(count)
            yield frame

    def _write(self, frames: Iterator[np.ndarray], beside: Iterator[np.ndarray], label: str,
               audio: Path | None) -> Iterator[int]:
        with VideoWriter(self.video_path, self.fps, audio_from=audio) as video, \
                VideoWriter(self.side_by_side_path, self.fps, audio_from=audio) as side:  # fmt: skip
            for count, (frame, other) in enumerate(zip(frames, beside), start=1):
                if self._cancelled.is_set():
                    raise Cancelled
                video.write(even_size(frame))
                side.write(side_by_side(other, frame, label))
                yield count
        stats = self.animator.stats
        self.result = AnimateResult(self.video_path, self.side_by_side_path, stats.frames, stats.seconds,
                                    stats.lost_frames)  # fmt: skip


def side_by_side(other: np.ndarray, result: np.ndarray, label: str) -> np.ndarray:
    """``uint8`` frame [``other`` | ``result``], each scaled to `SIDE_BY_SIDE_HEIGHT` rows and labelled."""
    tiles = []
    for image, text in ((other, label), (result, "result")):
        height, width = image.shape[:2]
        size = (max(2, round(width * SIDE_BY_SIDE_HEIGHT / height)), SIDE_BY_SIDE_HEIGHT)
        tiles.append(label_tile(cv2.resize(image, size, interpolation=cv2.INTER_AREA), text))
    return even_size(np.concatenate(tiles, axis=1))


def edit(animator: Animator, portrait: Portrait, controls: Controls, paste_back: bool = True) -> np.ndarray:
    """The portrait with changed expression / pose: one ``uint8`` RGB frame (the crop without ``paste_back``)."""
    (frame,) = animator.animate_landmarks(portrait.image, [portrait.landmarks], paste_back=paste_back,
                                          controls=controls, source_name=PORTRAIT,
                                          source_landmarks=portrait.landmarks)  # fmt: skip
    return frame



# --- Personalize -----------------------------------------------------------------------------------------------

PERSON_VIDEOS = "videos of the person"
BUNDLED_MODEL = "bundled one-shot model"
# tqdm's postfix of `metaportrait personalize`: "s=12" is the training seconds so far.
_TRAINING_SECONDS = re.compile(r"\bs=(\d+)\]")
_ERROR_LINE = re.compile(r"^error: (.*)$", re.MULTILINE)


class Models:
    """The models Animate can use in this run: the bundled one, then each personalised one as it is made.

    Animators are loaded when first asked for, once each; safe to use from several threads.
    """

    def __init__(self, bundled: Animator):
        self._paths: dict[str, Path | None] = {BUNDLED_MODEL: None}
        self._animators: dict[str, Animator] = {BUNDLED_MODEL: bundled}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def add(self, name: str, path: Path) -> None:
        """Offer the checkpoint folder ``path`` as ``name`` (a new name)."""
        with self._lock:
            if name in self._paths:
                raise ValueError(f"a model named {name!r} exists already")
            self._paths[name] = path

    def animator(self, name: str) -> Animator:
        """The animator of model ``name``. Raises `InputError` (naming ``model``) for a name never added."""
        with self._lock:
            if name not in self._paths:
                raise InputError("model", f"no model named {name!r} in this run")
            if name not in self._animators:
                self._animators[name] = Animator.from_pretrained(self._paths[name], precision="auto")
            return self._animators[name]


@dataclass(frozen=True)
class PersonalizeResult:
    """A finished personalisation: the checkpoint folder and its report (``report.json`` of `personalize`)."""

    model: Path
    report: dict

    def table(self) -> str:
        """Markdown: one row per model (one-shot, personalised), the held-out tail's metrics as columns, the better
        value in bold (`metaportrait.eval.report.markdown_table`, as `metaportrait eval` writes it)."""
        methods = {name: {metric: {"mean": value} for metric, value in values.items()}
                   for name, values in self.report["methods"].items()}  # fmt: skip
        return markdown_table({"methods": methods})

    def caution(self) -> str:
        """A sentence for when the personalised model is worse than the one-shot one on the held-out tail in some
        metric (`metaportrait.personalize.heldout_summary`), else the empty string."""
        worse = self.report.get("worse_than_oneshot") or []
        if not worse:
            return ""
        return (f"On the held-out last seconds it is worse than the model it started from in {', '.join(worse)}: "
                "for this person the bundled model may be the better choice.")


class PersonalizeJob:
    """Fine-tune the bundled model on uploaded videos of one person: `metaportrait personalize` in a child process.

    A child process, because personalisation has no point at which it could stop early: `cancel` (or closing
    `run`) terminates it at any moment, and its unfinished checkpoint folder stays inside the run folder, which
    is removed at exit. The last 10 s of the last video are held out, to compare the one-shot and the
    personalised model on them at the end (`PersonalizeResult.table`).

    Raises:
        InputError: (naming ``videos of the person``) a bad upload (now), or what `personalize` refuses (from
            `run`: no face, two people, too little video).
    """

    def __init__(self, videos: Iterable[str | Path], seconds: float, folder: RunFolder, limits: Limits):
        self.videos = [Path(video) for video in videos]
        if not self.videos:
            raise InputError(PERSON_VIDEOS, "nothing uploaded")
        for video in self.videos:
            check_video(video, PERSON_VIDEOS, limits)
        if not seconds > 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        self.seconds = seconds
        self.number = folder.new_job()
        self.output = folder.path / "models" / f"{self.number:04d}-personalized"
        self.cache = folder.path / "personalize-cache"  # front-end results, reused by a later run on the same videos
        self.log = folder.path / "logs" / f"{self.number:04d}-personalize.log"
        self.result: PersonalizeResult | None = None
        self._process: subprocess.Popen | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the job; `run` then raises `Cancelled`. Safe from any thread, at any time."""
        self._cancelled.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def run(self, poll_seconds: float = 0.5) -> Iterator[float | None]:
        """Run it; yields every ``poll_seconds`` the training seconds so far (None before training starts)."""
        self.output.parent.mkdir(exist_ok=True)
        self.log.parent.mkdir(exist_ok=True)
        command = [sys.executable, "-c", "import sys; from metaportrait.cli import main; sys.exit(main())",
                   "personalize", *map(str, self.videos), "--output", str(self.output),
                   "--seconds", f"{self.seconds:g}", "--cache", str(self.cache)]  # fmt: skip
        with open(self.log, "w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if self._cancelled.is_set():  # cancelled while starting
                self._process.terminate()
            while self._process.poll() is None:
                yield training_seconds(self.log.read_text(errors="replace"))
                time.sleep(poll_seconds)
        finally:
            if self._process.poll() is None:  # `run` closed early: the job is abandoned
                self._process.terminate()
                self._process.wait()
        if self._cancelled.is_set():
            raise Cancelled
        output = self.log.read_text(errors="replace")
        if self._process.returncode != 0:
            raise InputError(PERSON_VIDEOS, error_problem(output, self.videos))
        self.result = PersonalizeResult(self.output, json.loads((self.output / "report.json").read_text()))


def training_seconds(log: str) -> float | None:
    """The training seconds so far in `metaportrait personalize`'s progress output, None before training."""
    found = _TRAINING_SECONDS.findall(log)
    return float(found[-1]) if found else None


def error_problem(log: str, videos: Iterable[Path]) -> str:
    """The problem `metaportrait personalize` reported (its ``error: <path>: <problem>`` line), without the path
    of an upload, which means nothing to the user; the log's last line if it failed otherwise."""
    errors = _ERROR_LINE.findall(log)
    if not errors:
        lines = [line for line in log.replace("\r", "\n").splitlines() if line.strip()]
        return f"personalisation failed ({lines[-1] if lines else 'no output'})"
    message = errors[-1]
    for video in videos:
        message = message.removeprefix(f"{video}: ")
    return message
