"""The per-frame step of `Animator` on this CPU, per backend: everything after landmarks up to the 8-bit face crop.

Run ``python benchmarks/bench_step.py [--threads 2] [--frames 96]``; prints one JSON object. Importable:
``run(threads=2, frames=96) -> dict`` (the `metaportrait bench` command calls it, as ``step``).

The bundled model (or a randomly initialised lite generator when it is not installed: same cost) animates
scikit-image's astronaut to ``frames`` targets (its own landmarks with half a pixel of noise, in batches of
`DEFAULT_BATCH_SIZE`) through `Animator._generate`: line images, mesh prior, generator, conversion to 8 bits, no
paste-back. Per variant, milliseconds per frame of the whole step, and of the line images and the mesh prior
alone (``inputs_ms``, the same for every variant): ``torch_fp32``, ``torch_bf16`` (autocast), and with the
bundled model ``compiled`` (`metaportrait.compiled_backend`, in bf16 where the CPU has it; its build, made once
and cached, is not timed). Each variant is timed three times, interleaved; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from metaportrait.config import PRESETS
from metaportrait.data.drawing import draw_landmark_image
from metaportrait.models.generator import Generator
from metaportrait.pipeline import DEFAULT_BATCH_SIZE, Animator, bundled_checkpoint, build_prior, resolve_precision

ROUNDS = 3


def _animators() -> tuple[dict[str, Animator], str]:
    if (bundled_checkpoint() / "model.safetensors").is_file():
        animators = {"torch_fp32": Animator.from_pretrained(None, precision="fp32"),
                     "torch_bf16": Animator.from_pretrained(None, precision="bf16"),
                     "compiled": Animator.from_pretrained(None, backend="compiled", precision="auto")}
        return animators, "bundled lite checkpoint"
    torch.manual_seed(0)
    generator, cfg = Generator(PRESETS["lite"]), PRESETS["lite"]
    return {name: Animator(generator, cfg, precision=name.split("_")[1]) for name in ("torch_fp32", "torch_bf16")}, \
        "random lite weights (no bundled checkpoint)"


def run(threads: int = 2, frames: int = 96) -> dict:
    from skimage import data

    torch.set_num_threads(threads)
    animators, weights = _animators()
    portrait = data.astronaut()
    prepared = {name: animator.prepare_source(portrait) for name, animator in animators.items()}
    first_name = next(iter(animators))
    first, source = animators[first_name], prepared[first_name]
    rng = np.random.default_rng(0)
    targets = [source.crop_landmarks + rng.normal(0, 0.5, source.crop_landmarks.shape).astype(np.float32)
               for _ in range(frames)]
    batches = [targets[i:i + DEFAULT_BATCH_SIZE] for i in range(0, frames, DEFAULT_BATCH_SIZE)]
    times: dict[str, list[float]] = {name: [] for name in animators}
    inputs = []
    cfg, size = first.config, first.size
    for _ in range(ROUNDS):
        begin = time.perf_counter()
        for target in targets:
            draw_landmark_image(target, size, size, cfg.landmark_topology, cfg.line_thickness(size))
            build_prior(source.crop_landmarks, target, size, cfg)
        inputs.append(time.perf_counter() - begin)
        for name, animator in animators.items():
            animator._generate(prepared[name], batches[0])  # warm-up
            begin = time.perf_counter()
            for batch in batches:
                animator._generate(prepared[name], batch)
            times[name].append(time.perf_counter() - begin)
    per_frame = {name: round(1000 * statistics.median(values) / frames, 2) for name, values in times.items()}
    return {"threads": threads, "frames": frames, "batch_size": DEFAULT_BATCH_SIZE, "weights": weights,
            "step_ms_per_frame": per_frame, "inputs_ms_per_frame": round(1000 * statistics.median(inputs) / frames, 2),
            "compiled_precision": animators["compiled"].precision if "compiled" in animators else None,
            "cpu_bf16": resolve_precision("auto") == "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=96)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.frames), indent=2))


if __name__ == "__main__":
    main()
