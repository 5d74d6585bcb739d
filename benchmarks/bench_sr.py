"""Cost of the lite temporal super-resolution network (256 -> 512) on this CPU.

    .venv/bin/python benchmarks/bench_sr.py [--threads 2] [--preset lite]

Prints one JSON object: parameters, forward GFLOPs per 512 output frame (`metaportrait.models.sr.count_flops`),
wall time per frame when streaming a clip (`metaportrait.upscale.StreamingSR` as `animate --sr` runs it: exact
streaming, each frame through the network once, 4 frames per call), in float32 and under bfloat16 autocast
(``stream_bf16``: `animate --sr`'s default on CPUs with native bfloat16; ``windows_bf16``: the windows of 16 + 2
x 4 frames used before), per frame of one 16-frame clip, and process CPU time per frame on one thread (the
number to compare on a busy machine; check ``load_average``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from metaportrait.config import SR_PRESETS
from metaportrait.models.sr import TemporalSR, count_flops
from metaportrait.upscale import StreamingSR


def run(threads: int = 2, preset: str = "lite", frames: int = 32) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TemporalSR(SR_PRESETS[preset]).eval()
    size = model.cfg.input_size
    result = {
        "preset": preset,
        "threads": threads,
        "load_average": os.getloadavg()[0],
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_per_frame": count_flops(model, frames=3) / 1e9,
    }
    clip = torch.rand(16, 3, size, size)
    with torch.inference_mode():
        model(clip[:4])  # warm-up
        start = time.perf_counter()
        model(clip)
        result["clip16_ms_per_frame"] = (time.perf_counter() - start) * 1000 / 16
    crops = [np.zeros((size, size, 3), np.uint8)] * frames
    # ``windows_bf16``: the windowed streaming used before exact streaming (16 frames a call, 4 of context).
    for precision, windows, key in (("fp32", {}, "stream"), ("bf16", {}, "stream_bf16"),
                                    ("bf16", {"chunk": 16, "context": 4}, "windows_bf16")):
        with torch.inference_mode():
            start = time.perf_counter()
            list(StreamingSR(model, precision=precision, **windows).upscale(crops))
            result[f"{key}_ms_per_frame"] = (time.perf_counter() - start) * 1000 / frames
        result[f"{key}_fps"] = 1000 / result[f"{key}_ms_per_frame"]
    torch.set_num_threads(1)
    with torch.inference_mode():
        start = time.process_time()
        model(clip[:4])
        result["cpu_ms_per_frame_1thread"] = (time.process_time() - start) * 1000 / 4
    torch.set_num_threads(threads)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="lite", choices=sorted(SR_PRESETS))
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.preset)))
