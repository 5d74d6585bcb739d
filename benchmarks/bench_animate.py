"""End-to-end animation speed on this CPU, step by step, as `metaportrait animate` runs it.

Run ``python benchmarks/bench_animate.py [--threads 2] [--frames 60] [--driving FILE]``; prints one JSON object.
Importable: ``run(threads=2, frames=60, driving=None) -> dict`` (the `metaportrait bench` command calls it).

Each case animates a portrait with a driving video file and writes an H.264 mp4 (to a temporary folder), exactly
as the CLI does: decode, landmark tracking, motion transfer, model (line images, mesh prior, generator),
paste-back, encode. Cases:

* ``clip_256``: scikit-image's astronaut (512 px) driven by a 256 px clip;
* ``large_1024``: the astronaut upscaled to 1024 px, driven by the same clip upscaled to 1024 px;
* ``scripted``: the built-in scripted motion (`metaportrait.demo_motion`), no driving video: model and
  paste-back only;
* ``clip_256_onnx``: ``clip_256`` with the generator in ONNX Runtime (`metaportrait.onnx_backend`; the export,
  made once per checkpoint and cached, is not timed). Only with the bundled checkpoint.

The driving clip is ``--driving`` when given, otherwise a built-in one: the astronaut animated by the scripted
motion (talking, blinks, a head turn, a nod) with the model's face crop as output, made by this benchmark, so
the benchmark runs without any data. Per case: ``fps`` (frames over wall time from the call until the file is
written, setup included), ``setup_s`` (source preparation), and ``ms_per_frame`` per step from
`metaportrait.pipeline.AnimationStats.stage_seconds` plus ``encode``. ``peak_rss_mb`` is the process's peak
resident memory after all cases. The model is the bundled lite checkpoint when installed, otherwise a randomly
initialised lite generator (same cost; ``weights`` says which).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from metaportrait.config import PRESETS
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.demo_motion import scripted_motion
from metaportrait.io.video import VideoReader, VideoWriter, even_size
from metaportrait.models.generator import Generator
from metaportrait.pipeline import DEFAULT_BATCH_SIZE, Animator, bundled_checkpoint

FPS = 25.0
LARGE = 1024


def _animator() -> tuple[Animator, str]:
    if (bundled_checkpoint() / "model.safetensors").is_file():
        return Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE), "bundled lite checkpoint"
    config = PRESETS["lite"]
    return Animator(Generator(config), config), "random lite (no bundled checkpoint)"


def _write(path: Path, frames, fps: float = FPS) -> float:
    """Write ``frames`` to ``path``; returns the seconds spent in the encoder."""
    seconds = 0.0
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            begin = time.perf_counter()
            writer.write(even_size(frame))
            seconds += time.perf_counter() - begin
    return seconds


def builtin_clip(animator: Animator, portrait: np.ndarray, points: np.ndarray, frames: int, folder: Path) -> Path:
    """A driving clip made here: the portrait's face crop following the scripted motion (``frames`` frames)."""
    path = folder / "builtin_driving.mp4"
    _write(path, animator.animate_landmarks(portrait, scripted_motion(points, frames), crop_output=True,
                                            source_landmarks=points))
    return path


def upscaled_clip(clip: Path, side: int, folder: Path) -> Path:
    path = folder / f"driving_{side}.mp4"
    with VideoReader(clip) as reader:
        _write(path, (cv2.resize(f, (side, side), interpolation=cv2.INTER_CUBIC) for f in reader), reader.fps)
    return path


def _case(animator: Animator, portrait: np.ndarray, driving: Path | None, frames: int, folder: Path,
          points: np.ndarray | None = None) -> dict:
    """One end-to-end run into ``folder``/out.mp4; timings per step."""
    start = time.perf_counter()
    if driving is None:
        output = animator.animate_landmarks(portrait, scripted_motion(points, frames), source_landmarks=points)
        encode = _write(folder / "out.mp4", output)
    else:
        with VideoReader(driving) as reader:
            output = animator(portrait, iter(reader), driving_fps=reader.fps, driving_name=driving)
            encode = _write(folder / "out.mp4", output)
    total = time.perf_counter() - start
    stats = animator.stats
    per_frame = {stage: 1000 * seconds / stats.frames for stage, seconds in stats.stage_seconds.items()}
    per_frame["encode"] = 1000 * encode / stats.frames
    accounted = sum(stats.stage_seconds.values()) + encode
    return {
        "frames": stats.frames,
        "fps": stats.frames / total,
        "setup_s": total - accounted,  # source preparation and everything not in a step
        "ms_per_frame": {stage: round(ms, 2) for stage, ms in per_frame.items()},
    }


def run(threads: int = 2, frames: int = 60, driving: str | Path | None = None) -> dict:
    """Measure the three cases with ``threads`` torch threads; returns a JSON-ready dict."""
    from skimage import data

    torch.set_num_threads(threads)
    animator, weights = _animator()
    portrait = data.astronaut()  # uint8 (512, 512, 3)
    points = landmarks_of_image(portrait, "skimage.data.astronaut()")
    result: dict = {"threads": threads, "image_size": animator.size, "batch_size": animator.batch_size,
                    "weights": weights, "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="metaportrait_bench_") as tmp:
        folder = Path(tmp)
        clip = Path(driving) if driving is not None else builtin_clip(animator, portrait, points, frames, folder)
        result["driving"] = str(driving) if driving is not None else f"built-in scripted clip, {frames} frames"
        result["clip_256"] = _case(animator, portrait, clip, frames, folder)
        large_portrait = cv2.resize(portrait, (LARGE, LARGE), interpolation=cv2.INTER_CUBIC)
        result[f"large_{LARGE}"] = _case(animator, large_portrait, upscaled_clip(clip, LARGE, folder), frames, folder)
        result["scripted"] = _case(animator, portrait, None, frames, folder, points)
        if weights.startswith("bundled"):
            onnx = Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE, backend="onnx")
            result["clip_256_onnx"] = _case(onnx, portrait, clip, frames, folder)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_average_after"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--driving", type=Path, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.frames, args.driving), indent=2))


if __name__ == "__main__":
    main()
