"""`metaportrait landmarks`: dense MediaPipe landmarks (478 points) of an image or a video, with an overlay.

Examples::

    metaportrait landmarks portrait.jpg --output portrait.npz --overlay portrait_landmarks.png
    metaportrait landmarks clip.mp4 --output clip.npz --overlay clip_landmarks.mp4 --max-frames 100

The ``.npz`` holds ``landmarks`` (``float32`` ``(T, 478, 2)``, ``(x, y)`` pixels of the input), ``present``
(``bool`` ``(T,)``), ``fps`` (0 for an image) and ``image_size`` (``(height, width)``). An image gives T = 1.
For a video, frames without a face have ``present = False`` and repeat the nearest earlier good landmarks
(see `metaportrait.data.landmarks`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from metaportrait.data.drawing import TOPOLOGIES, draw_landmarks_on
from metaportrait.data.landmarks import iter_tracked, landmarks_of_image
from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_path
from metaportrait.io.image import IMAGE_SUFFIXES, is_image_path, is_video_path, read_image, write_image
from metaportrait.io.video import VideoReader, VideoWriter, even_size

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="image or video file")
    parser.add_argument("--output", "-o", type=Path, required=True, help="landmark file to write (.npz)")
    parser.add_argument(
        "--overlay",
        type=Path,
        default=None,
        help="also draw the landmark lines over the input (.png/.jpg for an image, .mp4 for a video)",
    )
    parser.add_argument("--no-smooth", action="store_true", help="video: no temporal (One-Euro) smoothing")
    parser.add_argument("--max-frames", type=int, default=None, help="video: only the first N frames")
    parser.add_argument(
        "--topology",
        choices=sorted(name for name in TOPOLOGIES if name != "official669"),  # official669 needs 669 points
        default="mediapipe478",
        help="line drawing used for the overlay",
    )


def run(args: argparse.Namespace) -> int:
    _check_output_path(args.output, (".npz",))
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(args.input, f"--max-frames must be at least 1, got {args.max_frames}")
    kind, image = _open_input(args.input)
    if kind == "image":
        if args.overlay is not None:
            _check_output_path(args.overlay, IMAGE_SUFFIXES)
        points = landmarks_of_image(image, args.input)
        landmarks, present, fps = points[None], np.ones(1, dtype=bool), 0.0
        size = image.shape[:2]
        if args.overlay is not None:
            write_image(args.overlay, draw_landmarks_on(image, points, args.topology))
    else:
        if args.overlay is not None:
            _check_output_path(args.overlay, (".mp4",))
        landmarks, present, fps, size = _track_video(args)
    write_landmark_file(args.output, landmarks, present, fps, size)
    overlay_note = f" and {args.overlay}" if args.overlay is not None else ""
    frames, with_face = len(present), int(present.sum())
    logger.info("%s: %d frame(s), face in %d -> %s%s", args.input, frames, with_face, args.output, overlay_note)
    return 0


def _open_input(path: Path) -> tuple[str, np.ndarray | None]:
    """("image", pixels) or ("video", None) for a readable input; InputError otherwise."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return "image", read_image(path)
    except InputError as image_error:
        try:
            with VideoReader(path):
                return "video", None
        except InputError as video_error:
            # Report the failure that matches what the file claims to be.
            if is_image_path(path):
                raise image_error from None
            if is_video_path(path):
                raise video_error from None
            raise InputError(path, "not an image or video file") from None


def _track_video(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float, tuple[int, int]]:
    landmarks, present = [], []
    with VideoReader(args.input) as reader:
        fps, size = reader.fps, (reader.height, reader.width)
        total = reader.frame_count if args.max_frames is None else min(args.max_frames, reader.frame_count)
        frames = tqdm(itertools.islice(reader, args.max_frames), total=total, unit="frame", disable=None)
        tracked = iter_tracked(frames, smooth=not args.no_smooth, fps=fps, name=args.input)
        writer = VideoWriter(args.overlay, fps) if args.overlay is not None else None
        try:
            for frame, points, found in tracked:
                landmarks.append(points)
                present.append(found)
                if writer is not None:
                    # Frames without a face are shown as they are, not with stale lines.
                    shown = draw_landmarks_on(frame, points, args.topology) if found else frame
                    writer.write(np.ascontiguousarray(even_size(shown)))
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
    return np.stack(landmarks).astype(np.float32), np.array(present, dtype=bool), float(fps), size


def _check_output_path(path: Path, suffixes: tuple[str, ...]) -> None:
    if path.suffix.lower() not in suffixes:
        raise InputError(path, f"output must end with {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise InputError(path.parent, "output folder does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # checked before the tracking, not after it
        raise InputError(path, f"output folder {str(path.parent)!r} is not writable")


def write_landmark_file(
    path: str | Path, landmarks: np.ndarray, present: np.ndarray, fps: float, image_size: tuple[int, int]
) -> None:
    """Write a landmark ``.npz`` atomically (temporary file in the same folder, then rename).

    Args:
        landmarks: ``float32`` ``(T, 478, 2)`` pixel coordinates.
        present: ``bool`` ``(T,)``.
        fps: frame rate, 0 for a still image.
        image_size: ``(height, width)`` of the input in pixels.
    """
    path = Path(path)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (478, 2) or present.shape != (len(landmarks),):
        raise ValueError(f"landmarks {landmarks.shape} / present {present.shape} do not match (T, 478, 2) / (T,)")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
            handle,
            landmarks=landmarks.astype(np.float32),
            present=present.astype(bool),
            fps=np.float64(fps),
            image_size=np.array(image_size, dtype=np.int64),
        )
