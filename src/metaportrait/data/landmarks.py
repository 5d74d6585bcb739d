"""Dense face landmarks: MediaPipe Face Mesh (478 points with irises) on images and videos, and One-Euro smoothing.

Landmarks are ``float32`` ``(478, 2)`` ``(x, y)`` in pixels of the image they were measured on (docs/contracts.md).
Coordinates are continuous: ``x = 0`` is the left edge of the image and the centre of pixel column ``i`` is
``i + 0.5`` (MediaPipe's normalised ``x`` times the width). Points may lie outside the image.

Video tracking reports a ``present`` flag per frame. A frame without a face keeps ``present = False`` and
repeats the last good landmarks; frames before the first detection repeat the first good landmarks (so
every frame has usable points). A clip with no face in any frame raises `NoFaceError`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from metaportrait.errors import InputError, NoFaceError

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 478  # 468 face-mesh points + 2 x 5 iris points (refine_landmarks=True)
NUM_MESH_POINTS = 468  # the face surface; the iris points 468..477 follow
# A still image may show several people; this many faces are measured and the largest is used.
MAX_FACES_IN_IMAGE = 4

# One-Euro defaults for landmark tracks in pixels (30 fps talking heads, faces 150-300 px wide). The cut-off
# is 1 Hz at rest and rises by 1 Hz per 5 px/s of speed, so speech is barely damped. Measured on fomm_00
# (256 px, Obama) the frame-to-frame acceleration of midline points halves (1.37 -> 0.69 px) while the peak
# lip opening keeps 90 % of its raw range; on lp_d3 (512 px) 0.65 -> 0.43 px with lip-gap error 0.23 px.
LANDMARK_MIN_CUTOFF = 1.0
LANDMARK_BETA = 0.2
LANDMARK_D_CUTOFF = 1.0


class OneEuroFilter:
    """One-Euro low-pass filter (Casiez et al., CHI 2012) for arrays of any fixed shape, vectorised.

    Each element is filtered independently with its own speed-adaptive cut-off
    ``min_cutoff + beta * |smoothed speed|`` (Hz): slow signals are smoothed strongly (less jitter), fast ones
    lightly (less lag). ``beta`` is in 1 / (signal units), e.g. per pixel for landmark coordinates.

    Args:
        fps: sampling rate of the signal in frames per second (> 0).
        min_cutoff: cut-off frequency at rest, Hz (> 0). Lower = smoother, more lag.
        beta: speed coefficient (>= 0). Higher = less lag on fast motion.
        d_cutoff: cut-off used to smooth the speed estimate, Hz (> 0).
    """

    def __init__(self, fps: float, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if not (fps > 0 and min_cutoff > 0 and d_cutoff > 0 and beta >= 0):
            raise ValueError(
                f"OneEuroFilter needs fps, min_cutoff, d_cutoff > 0 and beta >= 0; "
                f"got fps={fps}, min_cutoff={min_cutoff}, beta={beta}, d_cutoff={d_cutoff}"
            )
        self.fps = float(fps)
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self._value: np.ndarray | None = None  # last filtered value
        self._speed: np.ndarray | None = None  # last filtered derivative, units per second

    def _alpha(self, cutoff: float | np.ndarray) -> float | np.ndarray:
        # Smoothing factor of an exponential filter with this cut-off at this sampling period.
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * self.fps)

    def reset(self) -> None:
        """Forget the history: the next value passes through unchanged (use after a gap in the signal)."""
        self._value = None
        self._speed = None

    def __call__(self, value: np.ndarray) -> np.ndarray:
        """Filter the next sample; returns a new ``float64`` array of the same shape."""
        value = np.asarray(value, dtype=np.float64)
        if self._value is None:
            self._value = value.copy()
            self._speed = np.zeros_like(value)
            return self._value.copy()
        if value.shape != self._value.shape:
            raise ValueError(f"OneEuroFilter got shape {value.shape} after {self._value.shape}")
        speed = (value - self._value) * self.fps
        alpha_d = self._alpha(self.d_cutoff)
        self._speed = alpha_d * speed + (1.0 - alpha_d) * self._speed
        alpha = self._alpha(self.min_cutoff + self.beta * np.abs(self._speed))
        self._value = alpha * value + (1.0 - alpha) * self._value
        return self._value.copy()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send what native code writes to the stderr file descriptor into the debug log instead.

    MediaPipe's C++ side prints start-up chatter (a protobuf AttributeError line at import, TFLite and absl
    warnings when a graph first runs) straight to file descriptor 2, where Python's logging cannot filter it.
    `FaceMeshTracker` wraps its import, graph start-up and the frames up to the first face (the first detection
    logs a warning too) so CLI output holds only our own messages; the text is still shown with ``--verbose``.
    Python's own writes to ``sys.stderr`` inside the block are captured the same way.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", errors="replace").splitlines():
                logger.debug("mediapipe: %s", line)


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        description = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"expected a uint8 RGB frame of shape (H, W, 3), got {description}")


class FaceMeshTracker:
    """MediaPipe Face Mesh with irises (478 points), one face, for a single image or a video stream.

    With ``static_image_mode=False`` (video) MediaPipe runs its face detector only until it finds a face and
    then tracks it from the previous frame's landmarks, which is faster and steadier; feed the frames of one
    clip in order and use a new tracker per clip. With ``static_image_mode=True`` each call is independent.

    Use as a context manager or call `close` to free the MediaPipe graph.
    """

    def __init__(
        self,
        static_image_mode: bool = False,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        max_num_faces: int = 1,
    ):
        with quiet_native_stderr():
            import mediapipe as mp  # heavy (TFLite runtime); only needed when landmarks are measured

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_image_mode,
                max_num_faces=max_num_faces,
                refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
            # The graph loads its models on worker threads after the constructor returns; one blank frame
            # waits for that, so their start-up messages land inside this block. A blank frame holds no
            # face, so tracking state is unaffected.
            self._mesh.process(np.zeros((64, 64, 3), dtype=np.uint8))
        self._quiet = True  # until the first face: the first detection logs a warning of its own

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """Landmarks of the face in ``frame`` (``uint8`` ``(H, W, 3)`` RGB); the first one MediaPipe reports.

        Returns:
            ``float32`` ``(478, 2)`` ``(x, y)`` pixel coordinates, or ``None`` when no face is found.
        """
        faces = self.all_faces(frame)
        return faces[0] if faces else None

    def all_faces(self, frame: np.ndarray) -> list[np.ndarray]:
        """Landmarks of every face found in ``frame`` (at most ``max_num_faces``), each ``float32`` ``(478, 2)``."""
        _check_frame(frame)
        if self._mesh is None:
            raise RuntimeError("FaceMeshTracker is closed")
        if self._quiet:
            with quiet_native_stderr():
                result = self._mesh.process(np.ascontiguousarray(frame))
        else:
            result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return []
        self._quiet = False
        height, width = frame.shape[:2]
        faces = []
        for face in result.multi_face_landmarks:
            points = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float32)  # normalised to [0, 1]
            if points.shape != (NUM_LANDMARKS, 2):
                raise RuntimeError(f"Face Mesh returned {len(points)} points, expected {NUM_LANDMARKS}")
            faces.append(points * np.array([width, height], dtype=np.float32))
        return faces

    def close(self) -> None:
        """Release the MediaPipe graph (idempotent)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> FaceMeshTracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Frames larger than `iter_tracked`'s ``max_side``: the face is tracked in a square crop of this many pixels
# around it, CROP_MARGIN times the face's size (room for the motion from one frame to the next).
REFINE_CROP_SIDE = 384
REFINE_CROP_MARGIN = 2.0


class LargeFrameTracker:
    """Video tracking whose cost does not grow with the frame size: found on a downscaled frame, refined on a crop.

    A face is first found on the frame downscaled to at most ``max_side`` pixels on its longer side (a still-image
    Face Mesh, used only until a face is found and whenever it is lost). From then on it is tracked in a
    ``REFINE_CROP_SIDE``-pixel square crop of the full-resolution frame around the previous frame's face (a
    video-mode Face Mesh that follows the face from frame to frame, as `FaceMeshTracker` does on whole frames);
    the points are mapped back into frame pixels. Both images have a fixed size, so the cost per frame is the
    same for a 640 px and a 4K video. Call with frames of one clip, in order; same interface as `FaceMeshTracker`.
    """

    def __init__(self, max_side: int = 640):
        if max_side < 64:
            raise ValueError(f"max_side must be at least 64, got {max_side}")
        self.max_side = max_side
        self._finder = FaceMeshTracker(static_image_mode=True)
        self._refiner = FaceMeshTracker(static_image_mode=False)
        self._previous: np.ndarray | None = None  # the last frame's landmarks, frame pixels

    def _find(self, frame: np.ndarray) -> np.ndarray | None:
        """Landmarks on the frame downscaled to ``max_side`` (frame pixels), or None."""
        import cv2

        height, width = frame.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(frame, small_size, interpolation=cv2.INTER_AREA) if scale < 1 else frame
        points = self._finder(small)
        if points is None:
            return None
        return points * np.array([width / small_size[0], height / small_size[1]], dtype=np.float32)

    def _refine(self, frame: np.ndarray, around: np.ndarray) -> np.ndarray | None:
        """Landmarks tracked in the square crop around the landmarks ``around`` (frame pixels), or None."""
        import cv2

        mesh = around[:NUM_MESH_POINTS]
        low, high = mesh.min(axis=0), mesh.max(axis=0)
        side = REFINE_CROP_MARGIN * float(max(high - low))
        if not side > 1:
            return None
        cx, cy = (low + high) / 2
        scale = REFINE_CROP_SIDE / side  # frame pixels -> crop pixels
        x0, y0 = cx - side / 2, cy - side / 2
        # Continuous coordinates (pixel centres at +0.5) on both sides: crop = (frame - (x0, y0)) * scale.
        shift_x = -x0 * scale + 0.5 * scale - 0.5
        shift_y = -y0 * scale + 0.5 * scale - 0.5
        matrix = np.array([[scale, 0.0, shift_x], [0.0, scale, shift_y]], dtype=np.float64)
        # Linear sampling reads only the pixels the crop needs: its cost does not depend on the frame's size.
        patch = cv2.warpAffine(frame, matrix, (REFINE_CROP_SIDE, REFINE_CROP_SIDE), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        points = self._refiner(patch)
        if points is None:
            return None
        return (points / scale + np.array([x0, y0], dtype=np.float64)).astype(np.float32)

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """Landmarks of the face in ``frame`` (``float32`` ``(478, 2)`` frame pixels), or None."""
        _check_frame(frame)
        points = None
        if self._previous is not None:
            points = self._refine(frame, self._previous)
        if points is None:  # first frame, or the face left the crop: find it again on the whole frame
            found = self._find(frame)
            if found is not None:
                points = self._refine(frame, found)
        self._previous = points
        return points

    def close(self) -> None:
        self._finder.close()
        self._refiner.close()

    def __enter__(self) -> LargeFrameTracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def face_size(points: np.ndarray) -> float:
    """Size of a face in pixels: the longer side of its 468 mesh points' bounding box."""
    mesh = points[:NUM_MESH_POINTS]
    return float(max(mesh.max(axis=0) - mesh.min(axis=0)))


def landmarks_of_image(image: np.ndarray, name: str | Path = "<image>") -> np.ndarray:
    """Landmarks of the face in one still image; of the largest face when there are several (the choice is logged).

    Args:
        image: ``uint8`` ``(H, W, 3)`` RGB.
        name: file name (or description) of the image, used in the error message.

    Returns:
        ``float32`` ``(478, 2)`` ``(x, y)`` pixel coordinates.

    Raises:
        NoFaceError: no face was found.
    """
    with FaceMeshTracker(static_image_mode=True, max_num_faces=MAX_FACES_IN_IMAGE) as tracker:
        faces = tracker.all_faces(image)
    if not faces:
        raise NoFaceError(name, "no face found")
    sizes = [face_size(face) for face in faces]
    largest = int(np.argmax(sizes))
    if len(faces) > 1:
        centre = faces[largest][:NUM_MESH_POINTS].mean(axis=0)
        logger.info("%s: %d faces found; using the largest (%.0f px, centred at x=%.0f, y=%.0f)",
                    name, len(faces), sizes[largest], centre[0], centre[1])  # fmt: skip
    return faces[largest]


def iter_tracked(
    frames: Iterable[np.ndarray],
    smooth: bool = True,
    fps: float = 25.0,
    name: str | Path = "<frames>",
    max_side: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
    """Track the face through a stream of frames; yields ``(frame, landmarks, present)`` in frame order.

    ``landmarks`` is ``float32`` ``(478, 2)`` pixel coordinates, One-Euro smoothed when ``smooth`` (the filter
    restarts after every gap, so a face that reappears elsewhere does not glide there). Missing frames get
    ``present=False`` and the last good landmarks. Frames before the first detection are held back (with
    their frames, so memory grows with the length of a face-less opening) and released, with the first good
    landmarks, once a face is found.

    Args:
        frames: ``uint8`` ``(H, W, 3)`` RGB frames of one clip, in order.
        smooth: apply temporal One-Euro smoothing.
        fps: frame rate of the clip (sets the smoothing time constants).
        name: clip name for error messages.
        max_side: frames whose longer side exceeds this are tracked by `LargeFrameTracker` (found on the frame
            downscaled to ``max_side``, refined on a fixed-size crop around the face), at a cost that does not
            grow with their size; None, or frames up to this size: `FaceMeshTracker` on the whole frame.

    Raises:
        InputError: the stream holds no frames.
        NoFaceError: no frame holds a face.
    """
    smoother = OneEuroFilter(fps, LANDMARK_MIN_CUTOFF, LANDMARK_BETA, LANDMARK_D_CUTOFF) if smooth else None
    pending: list[np.ndarray] = []  # frames before the first detection
    last: np.ndarray | None = None
    count = 0
    with contextlib.ExitStack() as stack:
        tracker = None
        for frame in frames:
            count += 1
            if tracker is None:  # chosen by the first frame's size (one clip's frames share it)
                large = max_side is not None and isinstance(frame, np.ndarray) and max(frame.shape[:2]) > max_side
                tracker = stack.enter_context(LargeFrameTracker(max_side) if large else
                                              FaceMeshTracker(static_image_mode=False))
            points = tracker(frame)
            if points is None:
                if smoother is not None:
                    smoother.reset()
                if last is None:
                    pending.append(frame)
                else:
                    yield frame, last.copy(), False
                continue
            if smoother is not None:
                points = smoother(points).astype(np.float32)
            if last is None and pending:
                logger.debug("%s: first face in frame %d", name, len(pending))
                for held in pending:
                    yield held, points.copy(), False
                pending.clear()
            last = points
            yield frame, points, True
    if count == 0:
        raise InputError(name, "no frames")
    if last is None:
        raise NoFaceError(name, f"no face found in any of {count} frames")


def track_frames(
    frames: Iterable[np.ndarray],
    smooth: bool = True,
    fps: float = 25.0,
    name: str | Path = "<frames>",
) -> tuple[np.ndarray, np.ndarray]:
    """Track the face through a clip and collect the results (frames are not kept; see `iter_tracked`).

    Returns:
        ``landmarks`` ``float32`` ``(T, 478, 2)`` pixel coordinates and ``present`` ``bool`` ``(T,)``.

    Raises:
        InputError: the stream holds no frames.
        NoFaceError: no frame holds a face.
    """
    landmarks: list[np.ndarray] = []
    present: list[bool] = []
    for _, points, found in iter_tracked(frames, smooth=smooth, fps=fps, name=name):
        landmarks.append(points)
        present.append(found)
    return np.stack(landmarks).astype(np.float32), np.array(present, dtype=bool)
