"""Landmarks of large driving videos: full-resolution tracking against `LargeFrameTracker` (downscaled + crop).

Run ``python benchmarks/landmarks_large.py CLIP [--frames 150] [--max-side 640] [--scale 1]``; prints one JSON
object.

Both trackers see the same frames of ``CLIP`` (unsmoothed landmarks; decoding and the optional ``--scale``
upscaling not timed), one after the other on each frame, so a change in the machine's load hits both alike.
Reported: milliseconds per frame of each (median over frames), and the difference between their landmarks:
mean and 95th percentile of the per-point distance in frame pixels and at the scale of a 256-pixel face crop
(the distance divided by the side of the frame's `CropBox` and multiplied by 256), over the frames where both
found the face. The clips are read in place (e.g. from the shared data folder); nothing is written. The times
move with the CPU's load; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _track(path: Path, frames: int, trackers: list, scale: float) -> list[tuple[list, list[float]]]:
    """Per tracker: (landmarks per frame, seconds per frame)."""
    import cv2

    from metaportrait.io.video import VideoReader

    results = [([], []) for _ in trackers]
    with VideoReader(path) as reader:
        for frame in itertools.islice(iter(reader), frames):
            if scale != 1:
                frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            for tracker, (points, seconds) in zip(trackers, results):
                begin = time.perf_counter()
                points.append(tracker(frame))
                seconds.append(time.perf_counter() - begin)
    for tracker in trackers:
        tracker.close()
    return results


def run(clip: str | Path, frames: int = 150, max_side: int = 640, scale: float = 1.0) -> dict:
    from metaportrait.data.face import CropBox
    from metaportrait.data.landmarks import FaceMeshTracker, LargeFrameTracker
    from metaportrait.io.video import probe

    clip = Path(clip)
    info = probe(clip)
    load_before = os.getloadavg()[0]
    (full, full_s), (small, small_s) = _track(
        clip, frames, [FaceMeshTracker(static_image_mode=False), LargeFrameTracker(max_side)], scale)
    distances, scaled = [], []
    for a, b in zip(full, small):
        if a is None or b is None:
            continue
        distance = np.linalg.norm(a - b, axis=1)
        distances.append(distance)
        scaled.append(distance * 256 / CropBox.from_landmarks(a).side)
    distances, scaled = np.concatenate(distances), np.concatenate(scaled)
    return {
        "clip": clip.name, "size": f"{round(info.width * scale)}x{round(info.height * scale)}",
        "frames": len(full), "max_side": max_side,
        "found_full": sum(p is not None for p in full), "found_large_frame_tracker": sum(p is not None for p in small),
        "ms_per_frame_full": round(1000 * statistics.median(full_s[1:]), 2),
        "ms_per_frame_large_frame_tracker": round(1000 * statistics.median(small_s[1:]), 2),
        "mean_px": round(float(distances.mean()), 3), "p95_px": round(float(np.percentile(distances, 95)), 3),
        "mean_px_at_256_crop": round(float(scaled.mean()), 3),
        "p95_px_at_256_crop": round(float(np.percentile(scaled, 95)), 3),
        "load_average": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", type=Path)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--max-side", type=int, default=640)
    parser.add_argument("--scale", type=float, default=1.0, help="upscale the frames first (e.g. 2: 1080p -> 4K)")
    args = parser.parse_args()
    print(json.dumps(run(args.clip, args.frames, args.max_side, args.scale), indent=2))


if __name__ == "__main__":
    main()
