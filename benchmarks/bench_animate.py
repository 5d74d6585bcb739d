"""End-to-end animation speed at 256x256 on this CPU: frames per second of `metaportrait.pipeline.Animator`.

Run ``python benchmarks/bench_animate.py [--threads 2] [--frames 50]``; prints one JSON object. Importable:
``run(threads=2) -> dict`` (the `metaportrait bench` command calls it).

Measured, with scikit-image's astronaut as the portrait:

* ``video_fps``: driven by a real talking-head clip (``driving/lp_d0.mp4`` of the shared data, 512x512, decoded
  beforehand so file decoding is not counted): landmark tracking and smoothing, driver crop, relative motion
  transfer, line images, mesh prior, generator, paste-back into the 512x512 portrait. Without the shared data
  this entry is ``null`` and ``video_clip`` says so.
* ``scripted_fps``: driven by the built-in scripted motion (`metaportrait.demo_motion`): the same without tracking.
* ``setup_s``: time until the first frame (source landmarks, crop, identity embedding, first batch).
* ``compose_ms``: step 4 alone, the paste-back of one 256x256 crop into the 512x512 portrait with the source's
  detail kept where the model left it still (`metaportrait.pipeline.compose_frame`); ``compose_plain_ms``
  without the detail (``--no-source-detail``). Both are included in the frame rates above.

Frame rates exclude the first batch (``setup_s``). The model is the bundled lite checkpoint when installed,
otherwise a randomly initialised lite generator (same architecture and speed; ``weights`` says which). Timings
depend on what else runs on the machine: check ``load_average``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from metaportrait.config import PRESETS
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.demo_motion import scripted_motion
from metaportrait.models.generator import Generator
from metaportrait.pipeline import DEFAULT_BATCH_SIZE, Animator, bundled_checkpoint, compose_frame

# ../shared beside the repository, as in tests/conftest.py; METAPORTRAIT_SHARED overrides it.
SHARED = Path(os.environ.get("METAPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CLIP = SHARED / "data" / "driving" / "lp_d0.mp4"


def _animator(batch_size: int) -> tuple[Animator, str]:
    if (bundled_checkpoint() / "model.safetensors").is_file():
        return Animator.from_pretrained(None, batch_size=batch_size), "bundled lite checkpoint"
    config = PRESETS["lite"]
    return Animator(Generator(config), config, batch_size=batch_size), "random lite (no bundled checkpoint yet)"


def _timed(frames: Iterator[np.ndarray], count: int, start: float, batch_size: int) -> tuple[float, float]:
    """Consume ``count`` frames; returns (seconds until the first batch was out, fps over the rest)."""
    first_batch_done = None
    produced = 0
    for _ in itertools.islice(frames, count):
        produced += 1
        if produced == batch_size:
            first_batch_done = time.perf_counter()
    end = time.perf_counter()
    if first_batch_done is None or produced <= batch_size:
        raise ValueError(f"need more than one batch of frames to time, got {produced}")
    return first_batch_done - start, (produced - batch_size) / (end - first_batch_done)


def _compose_ms(source, face: np.ndarray, still: np.ndarray | None, repeats: int = 50) -> float:
    """Milliseconds per `compose_frame` call (median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        compose_frame(source, face, True, False, still)
        times.append(time.perf_counter() - begin)
    return 1000 * float(np.median(times))


def run(threads: int = 2, frames: int = 40, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Measure the animator with ``threads`` torch threads on ``frames`` frames; returns a JSON-ready dict."""
    from skimage import data

    torch.set_num_threads(threads)
    animator, weights = _animator(batch_size)
    portrait = data.astronaut()  # uint8 (512, 512, 3)
    points = landmarks_of_image(portrait, "skimage.data.astronaut()")
    result: dict = {
        "threads": threads,
        "image_size": animator.size,
        "batch_size": batch_size,
        "weights": weights,
        "load_average": os.getloadavg()[0],
    }

    start = time.perf_counter()
    targets = scripted_motion(points, frames)
    setup, fps = _timed(animator.animate_landmarks(portrait, targets, source_landmarks=points), frames, start,
                        batch_size)
    result.update(scripted_fps=fps, scripted_ms_per_frame=1000 / fps, setup_s=setup)

    source = animator.prepare_source(portrait, "skimage.data.astronaut()", points)
    face = source.crop  # any crop times the same
    still = np.linspace(0, 1, animator.size * animator.size, dtype=np.float32).reshape(animator.size, animator.size)
    result.update(compose_ms=_compose_ms(source, face, still), compose_plain_ms=_compose_ms(source, face, None))

    if CLIP.is_file():
        from metaportrait.io.video import read_video

        clip, clip_fps = read_video(CLIP, max_frames=frames)
        start = time.perf_counter()
        _, fps = _timed(animator(portrait, iter(clip), driving_fps=clip_fps, source_landmarks=points), len(clip),
                        start, batch_size)
        result.update(video_clip=str(CLIP), video_fps=fps, video_ms_per_frame=1000 / fps,
                      lost_frames=animator.stats.lost_frames)
    else:
        result.update(video_clip=f"missing: {CLIP}", video_fps=None, video_ms_per_frame=None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.frames, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
