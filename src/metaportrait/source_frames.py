"""Source frames: other frames of the portrait's person, one of which is animated in place of the portrait.

One photo does not hold a person's teeth, profile or the way their hair falls when they turn. When the portrait
comes from a video (the same person, the same camera), the video's other frames do: for every output frame the
`Animator` animates the source frame nearest in pose and expression to the target instead of the portrait
(MetaPortrait's personalisation issue, "the person's video as a bank of sources"; training-free, and it combines
with a fine-tuned model). Measured in docs/results.md, "Personalization".

The frames must share the portrait's framing (same camera, same size): the output frame is the chosen source
frame with its face re-animated, so its background is that frame's. The choice is made per target with
hysteresis (a new frame must be `SWITCH_MARGIN` nearer than the current one) and a minimum stay of
`MIN_STAY_SECONDS`, and each switch cross-fades over `FADE_SECONDS`: switching sources without them flickers
(warping error 3-5x the portrait's alone, docs/experiments.md). Both times become frame counts at the
animation's frame rate (`frames_at`).

Frames that look unlike the portrait outside the face count as farther (`appearance_differences`; the landmark
distance is multiplied by ``1 + difference / APPEARANCE_SCALE``): the output shows the chosen frame's body,
hands and background, and a target's landmarks say nothing about those, so the portrait's are the best guess.
Without it a speaker who moves her hands and body a lot came out worse with source frames than without
(docs/experiments.md, where the scale was chosen on videos other than those of docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from metaportrait.data.landmarks import MAX_FACES_IN_IMAGE, FaceMeshTracker, face_size
from metaportrait.data.pairs import LEFT_EYE_POINTS, MOUTH_POINTS, RIGHT_EYE_POINTS
from metaportrait.errors import InputError
from metaportrait.io.video import VideoReader
from metaportrait.prior.masks import face_mask

MAX_SOURCE_FRAMES = 64  # frames kept from a source video, spread evenly over it
SWITCH_MARGIN = 0.3  # switch to a frame only when its distance is below (1 - this) x the current one's
MIN_STAY_SECONDS = 0.4  # a chosen source is kept at least this long (10 frames at 25 fps)
FADE_SECONDS = 0.16  # a switch cross-fades over this long (4 frames at 25 fps; both sources are animated)
APPEARANCE_SCALE = 20.0  # grey levels outside the faces that double a frame's landmark distance
APPEARANCE_SIDE = 256  # frames are compared at this longer side (px)
FACE_MARGIN = 0.1  # the faces left out of the comparison are grown by this share of the face size


def frames_at(seconds: float, fps: float) -> int:
    """``seconds`` as a whole number of frames at ``fps`` (rounded)."""
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    return int(round(seconds * fps))


def landmark_weights() -> np.ndarray:
    """``float32`` ``(478,)`` weights of the landmark distance: the mouth x4, the eyes x2 (expression matters most
    there), every other point x1."""
    weights = np.ones(478, np.float32)
    weights[list(RIGHT_EYE_POINTS) + list(LEFT_EYE_POINTS)] = 2.0
    weights[list(MOUTH_POINTS)] = 4.0
    return weights


def spread_indices(count: int, max_frames: int) -> np.ndarray:
    """Up to ``max_frames`` indices into ``count`` items, spread evenly from the first to the last."""
    return np.unique(np.linspace(0, count - 1, min(max_frames, count)).round().astype(int))


@dataclass(frozen=True)
class SourceFrames:
    """Frames of the portrait's person, in the portrait's framing.

    images: ``uint8`` ``(N, H, W, 3)`` RGB, the portrait's ``(H, W)``.
    landmarks: ``float32`` ``(N, 478, 2)`` pixels of ``images``.
    """

    images: np.ndarray
    landmarks: np.ndarray
    name: str = "<source frames>"

    def __post_init__(self):
        images, points = self.images, self.landmarks
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"source frames must be uint8 (N >= 1, H, W, 3), got {images.dtype} {images.shape}")
        if points.shape != (len(images), 478, 2):
            raise ValueError(f"source frame landmarks must be ({len(images)}, 478, 2), got {points.shape}")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_video(cls, path: str | Path, max_frames: int = MAX_SOURCE_FRAMES) -> SourceFrames:
        """Up to ``max_frames`` frames spread evenly over a video, with their landmarks (frames without a face
        are left out).

        Raises:
            InputError: unreadable video, or no face in any sampled frame.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        with VideoReader(path) as reader:
            wanted = set(spread_indices(reader.frame_count, max_frames).tolist())
            picked = [frame for index, frame in enumerate(reader) if index in wanted]
        if not picked:
            raise InputError(path, "no frame could be read")
        # Filled in place while the decoded frames are let go: a full-HD video's 64 frames are 400 MB.
        images = np.empty((len(picked), *picked[0].shape), np.uint8)
        points = []
        with FaceMeshTracker(static_image_mode=True, max_num_faces=MAX_FACES_IN_IMAGE) as tracker:
            for k in range(len(picked)):
                frame, picked[k] = picked[k], None
                faces = tracker.all_faces(frame)
                if faces:
                    images[len(points)] = frame
                    points.append(max(faces, key=face_size))
        if not points:
            raise InputError(path, f"no face in any of the {len(picked)} sampled frames")
        return cls(images[:len(points)], np.stack(points).astype(np.float32), str(path))

    def check_framing(self, height: int, width: int) -> None:
        """Raises `InputError` unless the frames have the portrait's size (the same camera is assumed)."""
        if self.images.shape[1:3] != (height, width):
            raise InputError(self.name, f"source frames are {self.images.shape[2]}x{self.images.shape[1]} but the "
                             f"portrait is {width}x{height}; they must come from the portrait's video (same framing)")


def appearance_differences(frames: SourceFrames, portrait: np.ndarray, portrait_landmarks: np.ndarray) -> np.ndarray:
    """``float32`` ``(N,)``: how different each frame looks from the portrait outside the faces, as the mean
    absolute difference in grey levels (0-255, RGB averaged) over the pixels outside both faces' hulls (grown by
    `FACE_MARGIN` of the face size), both images at `APPEARANCE_SIDE` px on the longer side.

    Args:
        portrait: ``uint8`` ``(H, W, 3)``, the frames' size; portrait_landmarks: ``(478, 2)`` pixels of it.
    """
    height, width = portrait.shape[:2]
    scale = min(1.0, APPEARANCE_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2's (width, height)

    def small(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)

    def face(points: np.ndarray) -> np.ndarray:
        points = points * scale
        return face_mask(points, size[1], size[0], FACE_MARGIN * face_size(points), 0.0)

    reference, reference_face = small(portrait), face(np.asarray(portrait_landmarks, np.float32))
    differences = []
    for image, points in zip(frames.images, frames.landmarks):
        outside = 1.0 - np.maximum(reference_face, face(points))
        difference = np.abs(small(image) - reference).mean(-1)
        differences.append((difference * outside).sum() / max(outside.sum(), 1.0))
    return np.asarray(differences, np.float32)


class SourceChooser:
    """Per target, which source to animate: -1 for the portrait, else an index into `SourceFrames`.

    Args:
        frames: the candidate frames.
        portrait_landmarks: ``(478, 2)`` pixels of the portrait (the start, and a candidate throughout).
        margin: see `SWITCH_MARGIN`.
        min_stay: calls (output frames) a chosen source is kept at least.
        appearance: ``(N,)`` `appearance_differences` of the frames, or None (landmarks alone).
        appearance_scale: see `APPEARANCE_SCALE`.
    """

    def __init__(self, frames: SourceFrames, portrait_landmarks: np.ndarray, margin: float = SWITCH_MARGIN,
                 min_stay: int = 10, appearance: np.ndarray | None = None,
                 appearance_scale: float = APPEARANCE_SCALE):
        self.candidates = np.concatenate([frames.landmarks, np.asarray(portrait_landmarks, np.float32)[None]])
        if appearance is not None and np.shape(appearance) != (len(frames),):
            raise ValueError(f"appearance must be ({len(frames)},), got {np.shape(appearance)}")
        if not appearance_scale > 0:
            raise ValueError(f"appearance_scale must be positive, got {appearance_scale}")
        penalty = np.zeros(len(frames)) if appearance is None else np.asarray(appearance) / appearance_scale
        self.factors = np.append(1.0 + penalty, 1.0).astype(np.float32)  # the portrait (last) looks like itself
        self.weights = landmark_weights()
        self.margin, self.min_stay = margin, min_stay
        self.current, self.stay = -1, min_stay
        self.switches = 0

    def distances(self, target: np.ndarray) -> np.ndarray:
        """``(N + 1,)`` weighted mean point distance (pixels) of every candidate to ``target`` ``(478, 2)`` in
        portrait pixels, times the candidate's appearance factor; the last entry is the portrait's."""
        points = (np.linalg.norm(self.candidates - target[None], axis=-1) * self.weights).sum(-1) / self.weights.sum()
        return points * self.factors

    def __call__(self, target: np.ndarray) -> int:
        distance = self.distances(target)
        best = int(distance.argmin())
        best = -1 if best == len(distance) - 1 else best
        self.stay += 1
        if best != self.current and self.stay >= self.min_stay and \
                distance[best] < (1 - self.margin) * distance[self.current]:
            self.current, self.stay = best, 0
            self.switches += 1
        return self.current
