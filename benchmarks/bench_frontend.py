"""Speed of the face front-end on one CPU thread: landmark tracking, line-image rendering, cropping.

Run ``python benchmarks/bench_frontend.py [--threads N] [--frames N]``; prints one JSON object. Importable:
``run(threads=1) -> dict`` (the `metaportrait bench` command calls it).

Measured:
* ``landmarks_ms``: MediaPipe Face Mesh (478 points, tracking mode) per frame of a real 256x256 talking-head
  clip (``train_pool/vox_256/fomm_04.mp4`` of the shared data; a synthesised moving crop of scikit-image's
  astronaut when that file is missing). Frames are decoded beforehand; the tracker's start-up and first
  frames are excluded.
* ``render_ms``: `draw_landmark_image` at 256x256 for each topology. The MediaPipe topologies use the clip's
  own landmarks; ``official669`` has no 669-point tracker here, so it uses random points in the middle of
  the canvas (long lines: an upper bound).
* ``crop_ms`` / ``paste_back_ms``: a 512x512 frame to a 256 crop and back (`metaportrait.data.face`).
* ``prior_ms``: the per-frame mesh prior of the lite model at 64 and 256 px, first frame -> each frame of the
  clip: `mesh_warp_grid` (face-masked, for the baseline; upper-lip fill, for the model) and `prior_masks` with
  and without the mouth template. Targets: the grid <= 5 ms at 64 px and <= 15 ms at 256 px.

"One thread" pins the process to one CPU core (``sched_setaffinity``) for the measurements, so MediaPipe's
and OpenCV's internal thread pools cannot use more; targets are landmarks < 10 ms and rendering < 2 ms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from metaportrait.data.drawing import TOPOLOGIES, draw_landmark_image
from metaportrait.data.face import CropBox, crop, paste_back
from metaportrait.data.landmarks import FaceMeshTracker
from metaportrait.prior.masks import prior_masks
from metaportrait.prior.warp import mesh_warp_grid

# ../shared beside the repository, as in tests/conftest.py; METAPORTRAIT_SHARED overrides it.
SHARED = Path(os.environ.get("METAPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CLIP = SHARED / "data" / "train_pool" / "vox_256" / "fomm_04.mp4"
WARMUP_FRAMES = 5


def _clip_frames(count: int) -> tuple[list[np.ndarray], str]:
    if CLIP.is_file():
        from metaportrait.io.video import VideoReader

        with VideoReader(CLIP) as reader:
            return list(itertools.islice(reader, count)), str(CLIP)
    from skimage import data

    # Stand-in: the astronaut's face drifting and zooming slightly inside a 256 crop.
    astronaut = data.astronaut()
    frames = []
    for k in range(count):
        phase = 2 * np.pi * k / 60
        box = CropBox(225 + 12 * np.sin(phase), 125 + 6 * np.cos(phase), 250 + 10 * np.sin(2 * phase))
        frames.append(crop(astronaut, box, 256))
    return frames, "synthetic: moving crop of skimage.data.astronaut()"


def _time_ms(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``function`` in milliseconds over ``repeats`` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run(threads: int = 1, frames: int = 120) -> dict:
    """Measure the front-end with ``threads`` CPU cores; returns a JSON-ready dict of timings in ms."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    clip, source = _clip_frames(frames + WARMUP_FRAMES)
    old_affinity = os.sched_getaffinity(0)
    old_cv2_threads = cv2.getNumThreads()
    os.sched_setaffinity(0, set(sorted(old_affinity)[:threads]))
    cv2.setNumThreads(threads)
    try:
        # Landmarks: tracking mode over the clip in order.
        landmarks, per_frame = [], []
        with FaceMeshTracker(static_image_mode=False) as tracker:
            for index, frame in enumerate(clip):
                start = time.perf_counter()
                points = tracker(frame)
                elapsed = (time.perf_counter() - start) * 1000
                if index >= WARMUP_FRAMES:
                    per_frame.append(elapsed)
                if points is not None:
                    landmarks.append(points)
        if not landmarks:
            raise RuntimeError(f"no face found in the benchmark clip {source}")
        # Rendering at 256 for every topology.
        points_256 = [p * (256 / clip[0].shape[1]) for p in landmarks]
        official_points = np.random.default_rng(0).uniform(0.3, 0.7, (669, 2))
        render = {}
        for name in TOPOLOGIES:
            if name == "official669":
                draw = lambda: draw_landmark_image(official_points, 256, 256, name, normalized=True)  # noqa: E731
            else:
                cycle = itertools.cycle(points_256)
                draw = lambda: draw_landmark_image(next(cycle), 256, 256, name)  # noqa: E731
            render[name] = _time_ms(draw, 200)
        # Crop and paste back at 512 -> 256 -> 512.
        frame_512 = cv2.resize(clip[0], (512, 512), interpolation=cv2.INTER_LINEAR)
        box = CropBox(256.0, 240.0, 400.0)
        face_crop = crop(frame_512, box, 256)
        crop_ms = _time_ms(lambda: crop(frame_512, box, 256), 100)
        paste_ms = _time_ms(lambda: paste_back(frame_512, face_crop, box), 100)
        prior = {}
        for size in (64, 256):
            scaled = [p * (size / clip[0].shape[1]) for p in landmarks]
            pairs = itertools.cycle(scaled[1:] or scaled)
            first = scaled[0]
            calls = {
                "grid_masked": lambda: mesh_warp_grid(first, next(pairs), size, size, face_masked=True),
                "grid_upper_lip": lambda: mesh_warp_grid(first, next(pairs), size, size, mouth="upper_lip"),
                "masks": lambda: prior_masks(first, next(pairs), size, size, "upper_lip"),
                "masks_template": lambda: prior_masks(first, next(pairs), size, size, "upper_lip", template=True),
            }
            prior[str(size)] = {name: round(_time_ms(call, 50), 3) for name, call in calls.items()}
    finally:
        os.sched_setaffinity(0, old_affinity)
        cv2.setNumThreads(old_cv2_threads)
    return {
        "threads": threads,
        "source": source,
        "frames_timed": len(per_frame),
        "faces_found": len(landmarks),
        "landmarks_ms": round(statistics.mean(per_frame), 3),
        "landmarks_ms_median": round(statistics.median(per_frame), 3),
        "render_ms": {name: round(ms, 3) for name, ms in render.items()},
        "crop_ms": round(crop_ms, 3),
        "paste_back_ms": round(paste_ms, 3),
        "prior_ms": prior,
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames", type=int, default=120, help="timed frames of the clip")
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.frames), indent=2))


if __name__ == "__main__":
    main()
