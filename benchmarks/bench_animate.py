"""End-to-end animation speed on this CPU, step by step, as `metaportrait animate` runs it.

Run ``python benchmarks/bench_animate.py [--threads 2] [--frames 60] [--driving FILE] [--cases NAME ...]``; prints
one JSON object. Importable: ``run(threads=2, frames=60, driving=None, cases=None) -> dict`` (the
`metaportrait bench` command calls it).

Each case animates a portrait with a driving video file and writes an H.264 mp4 (to a temporary folder), exactly
as the CLI does: decode, landmark tracking, motion transfer, model (line images, mesh prior, generator),
paste-back, encode, with the stages overlapping (decoding and tracking ahead of the generator, encoding behind it,
in threads; `metaportrait.stages`), so the per-step times add up to more than the wall time. Cases:

* ``clip_256``: scikit-image's astronaut (512 px) driven by a 256 px clip;
* ``large_1024``: the astronaut upscaled to 1024 px, driven by the same clip upscaled to 1024 px;
* ``large_1024_compiled``: ``large_1024`` with the compiled generator, as ``clip_256_compiled`` (#22's 20
  frames/s at 1024 px is measured on it). Only with the bundled checkpoint.
* ``scripted``: the built-in scripted motion (`metaportrait.demo_motion`), no driving video: model and
  paste-back only;
* ``clip_256_onnx``: ``clip_256`` with the generator in ONNX Runtime (`metaportrait.onnx_backend`; the export,
  made once per checkpoint and cached, is not timed). Only with the bundled checkpoint.
* ``clip_256_bf16``: ``clip_256`` with the generator under bfloat16 autocast (``precision="bf16"``; on CPUs
  without native bfloat16 it is emulated and slower).
* ``clip_256_compiled``: ``clip_256`` with the generator compiled ahead of time (``backend="compiled"``,
  `metaportrait.compiled_backend`) in the CLI's default precision (``auto``); the build, made once per
  checkpoint and cached, is not timed. Only with the bundled checkpoint.
* ``clip_256_sr``: ``clip_256`` with the bundled super-resolution network (`animate --sr`: 512 face crops pasted
  back), both networks in the CLI's default precision (``auto``). Only when SR weights are bundled.
* ``clip_256_sr_compiled``: ``clip_256_sr`` with ``backend="compiled"``: the generator's step and the SR
  network's finish compiled ahead of time (builds, made once and cached, not timed). Only with the bundled
  checkpoint and SR weights.

The driving clip is ``--driving`` when given, otherwise a built-in one: the astronaut animated by the scripted
motion (talking, blinks, a head turn, a nod) with the model's face crop as output, made by this benchmark, so
the benchmark runs without any data. Per case: ``fps`` (frames over wall time from the call until the file is
written, setup included), ``setup_s`` (source preparation and what no step accounts for; with overlapping stages
the steps' sum can exceed the wall time, so it is clipped at 0), ``ms_per_frame`` per step from
`metaportrait.pipeline.AnimationStats.stage_seconds` plus ``encode``, and ``peak_rss_mb``: the process's peak
resident memory during that case (the peak is reset before each case where Linux allows it, ``/proc/self/
clear_refs``; otherwise it is the peak so far, and ``peak_rss_scope`` says so). ``peak_rss_mb`` at the top level
is the whole run's. ``--cases`` runs only the named cases. The model is the bundled lite checkpoint when
installed, otherwise a randomly initialised lite generator (same cost; ``weights`` says which).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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
from metaportrait.cli.bench import peak_rss_mb, reset_peak_rss
from metaportrait.pipeline import DEFAULT_BATCH_SIZE, Animator, bundled_checkpoint
from metaportrait.stages import WriteBehind
from metaportrait.upscale import bundled_sr

FPS = 25.0
LARGE = 1024
CASES = ("clip_256", f"large_{LARGE}", f"large_{LARGE}_compiled", "scripted", "clip_256_onnx", "clip_256_bf16",
         "clip_256_compiled", "clip_256_sr", "clip_256_sr_compiled")


def _animator() -> tuple[Animator, str]:
    if (bundled_checkpoint() / "model.safetensors").is_file():
        return Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE), "bundled lite checkpoint"
    config = PRESETS["lite"]
    return Animator(Generator(config), config), "random lite (no bundled checkpoint)"


def _write(path: Path, frames, fps: float = FPS) -> float:
    """Write ``frames`` to ``path``, encoding behind in a thread as `metaportrait animate` does; returns the
    seconds spent in the encoder."""
    seconds = 0.0

    def write(frame: np.ndarray) -> None:
        nonlocal seconds
        begin = time.perf_counter()
        writer.write(even_size(frame))
        seconds += time.perf_counter() - begin

    with VideoWriter(path, fps) as writer, WriteBehind(write, depth=2 * DEFAULT_BATCH_SIZE) as behind:
        for frame in frames:
            behind.put(frame)
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
    """One end-to-end run into ``folder``/out.mp4; timings per step and peak memory."""
    scope = "this case" if reset_peak_rss() else "the process so far"
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
        "setup_s": max(0.0, total - accounted),  # source preparation and everything not in a step
        "ms_per_frame": {stage: round(ms, 2) for stage, ms in per_frame.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_scope": scope,
    }


def run(threads: int = 2, frames: int = 60, driving: str | Path | None = None,
        cases: list[str] | None = None) -> dict:
    """Measure the cases (all of `CASES`, or ``cases``) with ``threads`` torch threads; returns a JSON-ready dict."""
    from skimage import data

    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown:
        raise ValueError(f"unknown animate cases {unknown}; known: {', '.join(CASES)}")
    wanted = set(cases or CASES)

    torch.set_num_threads(threads)
    animator, weights = _animator()
    portrait = data.astronaut()  # uint8 (512, 512, 3)
    points = landmarks_of_image(portrait, "skimage.data.astronaut()")

    @functools.cache
    def compiled_animator() -> Animator:  # one for both compiled cases (loading the package is not timed)
        return Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE, backend="compiled", precision="auto")

    result: dict = {"threads": threads, "image_size": animator.size, "batch_size": animator.batch_size,
                    "weights": weights, "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="metaportrait_bench_") as tmp:
        folder = Path(tmp)
        clip = Path(driving) if driving is not None else builtin_clip(animator, portrait, points, frames, folder)
        result["driving"] = str(driving) if driving is not None else f"built-in scripted clip, {frames} frames"
        if "clip_256" in wanted:
            result["clip_256"] = _case(animator, portrait, clip, frames, folder)
        if wanted & {f"large_{LARGE}", f"large_{LARGE}_compiled"}:
            large_portrait = cv2.resize(portrait, (LARGE, LARGE), interpolation=cv2.INTER_CUBIC)
            large_clip = upscaled_clip(clip, LARGE, folder)
        if f"large_{LARGE}" in wanted:
            result[f"large_{LARGE}"] = _case(animator, large_portrait, large_clip, frames, folder)
        if f"large_{LARGE}_compiled" in wanted and weights.startswith("bundled"):
            compiled = compiled_animator()
            result[f"large_{LARGE}_compiled"] = {**_case(compiled, large_portrait, large_clip, frames, folder),
                                                 "precision": compiled.precision}
        if "scripted" in wanted:
            result["scripted"] = _case(animator, portrait, None, frames, folder, points)
        if "clip_256_onnx" in wanted and weights.startswith("bundled"):
            onnx = Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE, backend="onnx")
            result["clip_256_onnx"] = _case(onnx, portrait, clip, frames, folder)
        if "clip_256_bf16" in wanted:  # the same clip with the generator under bfloat16 autocast
            animator.precision = "bf16"
            result["clip_256_bf16"] = _case(animator, portrait, clip, frames, folder)
            animator.precision = "fp32"
        if "clip_256_compiled" in wanted and weights.startswith("bundled"):
            compiled = compiled_animator()
            result["clip_256_compiled"] = {**_case(compiled, portrait, clip, frames, folder),
                                           "precision": compiled.precision}
        if "clip_256_sr" in wanted and (bundled_sr() / "model.safetensors").is_file():
            upscaling = Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE, sr=True, precision="auto")
            result["clip_256_sr"] = {**_case(upscaling, portrait, clip, frames, folder),
                                     "precision": upscaling.precision}
        if "clip_256_sr_compiled" in wanted and (bundled_sr() / "model.safetensors").is_file() \
                and weights.startswith("bundled"):
            upscaling = Animator.from_pretrained(None, batch_size=DEFAULT_BATCH_SIZE, sr=True, precision="auto",
                                                 backend="compiled")
            result["clip_256_sr_compiled"] = {**_case(upscaling, portrait, clip, frames, folder),
                                              "precision": upscaling.precision}
    # The whole run's: the largest case peak (the per-case resets also reset the process's own peak).
    case_peaks = [value["peak_rss_mb"] for value in result.values() if isinstance(value, dict)]
    result["peak_rss_mb"] = round(max([peak_rss_mb(), *case_peaks]), 1)
    result["load_average_after"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--driving", type=Path, default=None)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.frames, args.driving, args.cases), indent=2))


if __name__ == "__main__":
    main()
