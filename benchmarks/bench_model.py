"""Cost of the lite base generator on this CPU: parameters, FLOPs, inference and training step time.

    .venv/bin/python benchmarks/bench_model.py [--threads 2] [--preset lite]

Prints one JSON object. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add;
convolutions and matmuls only, so grid_sample / interpolation are not counted). Timings are medians over repeats and
depend on what else runs on the machine: check ``load_average`` in the output; the ``*_cpu_ms_*_1thread`` entries
(process CPU time on one thread) are the numbers to compare across runs on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from metaportrait.config import PRESETS
from metaportrait.models.generator import Generator, example_inputs


def count_gflops(generator: Generator, inputs: dict[str, torch.Tensor], stage: str = "full") -> float:
    """Forward GFLOPs per frame (FlopCounterMode total divided by the batch size)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generator(**inputs, stage=stage)
    return counter.get_total_flops() / 1e9 / inputs["source"].shape[0]


def _median_ms(fn, repeats: int, warmup: int = 2, clock=time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append((clock() - start) * 1000)
    return statistics.median(times)


def run(threads: int = 2, preset: str = "lite", repeats: int = 10) -> dict:
    """Measure `preset` and return a JSON-safe dict (see the module docstring)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    generator = Generator(cfg)
    result: dict = {
        "preset": preset,
        "threads": threads,
        "load_average": os.getloadavg()[0],
        "params_M": sum(p.numel() for p in generator.parameters()) / 1e6,
        "warp_params_M": sum(p.numel() for p in generator.warp_parameters()) / 1e6,
        "refine_params_M": sum(p.numel() for p in generator.refine_parameters()) / 1e6,
    }
    frame = example_inputs(cfg, batch=1, size=256)
    result["gflops_per_frame_256"] = count_gflops(generator, frame)
    result["gflops_warp_only_256"] = count_gflops(generator, frame, stage="warp")

    # Inference, batch 1 at 256: plain eval, then inference_mode, then channels_last.
    generator.eval()
    with torch.no_grad():
        result["infer_ms_256_no_grad"] = _median_ms(lambda: generator(**frame), repeats)
    with torch.inference_mode():
        result["infer_ms_256_inference_mode"] = _median_ms(lambda: generator(**frame), repeats)
    # A channels_last copy, made outside inference_mode so the training model below keeps normal tensors.
    generator_cl = copy.deepcopy(generator).to(memory_format=torch.channels_last)
    frame_cl = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and k != "prior_grid" else v
                for k, v in frame.items()}
    with torch.inference_mode():
        result["infer_ms_256_channels_last"] = _median_ms(lambda: generator_cl(**frame_cl), repeats)
    best = min(result["infer_ms_256_inference_mode"], result["infer_ms_256_channels_last"])
    result["infer_fps_256_best"] = 1000 / best
    # Process CPU time on one thread: close to the wall time of an idle core, and much less sensitive than wall
    # time to other jobs on a shared machine.
    torch.set_num_threads(1)
    with torch.inference_mode():
        result["infer_cpu_ms_256_1thread"] = _median_ms(lambda: generator(**frame), repeats, clock=time.process_time)
    torch.set_num_threads(threads)

    # Training step, batch 8 at 128: generator forward + backward of an L1 loss (no perceptual net, no D).
    generator.train()
    batch = example_inputs(cfg, batch=8, size=128)
    target = torch.rand(8, 3, 128, 128)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-4)

    def step(stage: str):
        out = generator(**{k: v for k, v in batch.items() if stage == "full" or k != "identity"}, stage=stage)
        image = out["output"] if stage == "full" else out["warped"]
        loss = (image - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result["train_step_ms_128_b8_full"] = _median_ms(lambda: step("full"), max(3, repeats // 2))
    result["train_step_ms_128_b8_warp"] = _median_ms(lambda: step("warp"), max(3, repeats // 2))
    torch.set_num_threads(1)
    result["train_step_cpu_ms_128_b8_full_1thread"] = _median_ms(
        lambda: step("full"), max(3, repeats // 2), clock=time.process_time
    )
    torch.set_num_threads(threads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="lite", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.preset, args.repeats), indent=2))


if __name__ == "__main__":
    main()
