"""`metaportrait demo`: the built-in example portrait (scikit-image's astronaut), landmarks and animation.

Writes to ``--output`` (default ``demo_output``):

* ``astronaut_landmarks.png`` (the dense landmark lines over the photo) and ``astronaut_landmarks.npz`` (same
  layout as `metaportrait landmarks`);
* ``demo.mp4``: the astronaut animated by a scripted motion built from her own landmarks (speech, blinks, a head
  turn and a nod; 4 s at 25 fps, `metaportrait.demo_motion`), with the bundled lite model or ``--checkpoint``;
* ``demo_side_by_side.mp4``: photo | target landmark lines | result.

It then prints the identity distance (dlib embedding, same person below 0.6) of a few result frames to the photo.
Nothing is downloaded: the photo ships with scikit-image and the weights with the package.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch

from metaportrait.cli.landmarks import write_landmark_file
from metaportrait.data.drawing import draw_landmark_image, draw_landmarks_on
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.demo_motion import DEMO_FPS, DEMO_SECONDS, scripted_motion
from metaportrait.errors import InputError, NoFaceError
from metaportrait.io.image import to_tensor, write_image
from metaportrait.io.video import VideoWriter
from metaportrait.models.identity import DLIB_SAME_PERSON_THRESHOLD, identity_distance
from metaportrait.pipeline import Animator, dlib_identity_encoder

logger = logging.getLogger(__name__)

ASTRONAUT = "skimage.data.astronaut()"
IDENTITY_SAMPLES = 4  # result frames whose identity distance to the photo is reported


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, default=Path("demo_output"), help="folder for the results")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder (model.safetensors + config.json); default: the bundled lite model")


def run(args: argparse.Namespace) -> int:
    animator = Animator.from_pretrained(args.checkpoint)  # a missing checkpoint fails before anything is written
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(args.output, f"cannot create the output folder ({error.strerror})") from None
    if not os.access(args.output, os.W_OK | os.X_OK):
        raise InputError(args.output, "output folder is not writable")
    for path in write_landmark_demo(args.output):
        logger.info("wrote %s", path)
    paths, distances = write_animation_demo(args.output, animator)
    for path in paths:
        logger.info("wrote %s", path)
    logger.info("identity distance of result frames to the photo (dlib; same person below %.1f):",
                DLIB_SAME_PERSON_THRESHOLD)
    for index, distance in distances:
        logger.info("  frame %3d: %s", index, "no face found" if distance is None else f"{distance:.3f}")
    return 0


def write_landmark_demo(out_dir: str | Path) -> list[Path]:
    """Dense landmarks of the astronaut: writes the overlay PNG and the landmark ``.npz`` into ``out_dir``.

    Returns:
        The paths written.
    """
    from skimage import data  # the example image ships with scikit-image: nothing is downloaded

    out_dir = Path(out_dir)
    image = data.astronaut()  # uint8 (512, 512, 3) RGB
    points = landmarks_of_image(image, ASTRONAUT)
    overlay_path, landmark_path = out_dir / "astronaut_landmarks.png", out_dir / "astronaut_landmarks.npz"
    write_image(overlay_path, draw_landmarks_on(image, points))
    write_landmark_file(landmark_path, points[None], np.ones(1, dtype=bool), 0.0, image.shape[:2])
    return [overlay_path, landmark_path]


def write_animation_demo(
    out_dir: str | Path, animator: Animator, num_frames: int = round(DEMO_FPS * DEMO_SECONDS)
) -> tuple[list[Path], list[tuple[int, float | None]]]:
    """Animate the astronaut with the scripted demo motion; writes ``demo.mp4`` and ``demo_side_by_side.mp4``.

    Args:
        out_dir: existing folder for the two videos.
        animator: the model, e.g. ``Animator.from_pretrained()`` (the bundled lite checkpoint).
        num_frames: length at 25 fps (default 4 s).

    Returns:
        The paths written, and ``(frame index, identity distance to the photo)`` for a few result frames
        (``None`` where no face is found in the result).
    """
    from skimage import data

    out_dir = Path(out_dir)
    image = data.astronaut()  # uint8 (512, 512, 3) RGB
    height, width = image.shape[:2]
    points = landmarks_of_image(image, ASTRONAUT)
    targets = scripted_motion(points, num_frames, DEMO_FPS)  # (T, 478, 2) pixels of the photo
    frames = animator.animate_landmarks(image, targets, source_name=ASTRONAUT, source_landmarks=points)

    sample_at = set(np.linspace(0, num_frames - 1, IDENTITY_SAMPLES).round().astype(int).tolist())
    samples: dict[int, np.ndarray] = {}
    video_path, side_path = out_dir / "demo.mp4", out_dir / "demo_side_by_side.mp4"
    with VideoWriter(video_path, DEMO_FPS) as video, VideoWriter(side_path, DEMO_FPS) as side:
        for index, (frame, target) in enumerate(zip(frames, targets, strict=True)):
            video.write(frame)
            side.write(np.concatenate([image, draw_landmark_image(target, height, width), frame], axis=1))
            if index in sample_at:
                samples[index] = frame
    logger.info("%d frames at %.2f frames/s", animator.stats.frames, animator.stats.fps)

    # Identity check: the result's own landmarks (not the targets) align each face for the embedding.
    encoder = animator.identity_encoder or dlib_identity_encoder()
    with torch.no_grad():
        reference = encoder.embed(to_tensor(image), torch.from_numpy(points)[None])
        distances: list[tuple[int, float | None]] = []
        for index, frame in sorted(samples.items()):
            try:
                frame_points = landmarks_of_image(frame, f"demo frame {index}")
            except NoFaceError:
                distances.append((index, None))
                continue
            embedding = encoder.embed(to_tensor(frame), torch.from_numpy(frame_points)[None])
            distances.append((index, float(identity_distance(embedding, reference)[0])))
    return [video_path, side_path], distances
