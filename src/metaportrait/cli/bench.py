"""`metaportrait bench`: run the speed benchmarks in the repository's ``benchmarks/`` folder, print one JSON object.

The benchmark scripts live beside the package in a source checkout (they read the shared test data and are not
installed), so this command works from a checkout (``pip install -e .``, as ``make`` does). Each script defines
``run(threads=...) -> dict``; the output is ``{"threads": N, "reference_ms": {...}, "<name>": <that dict>, ...}``.

``reference_ms`` is a fixed workload timed before and after the benchmarks in the same run (`reference_ms`):
ten 3x3 convolutions 64 -> 64 with ReLU on a 1x64x128x128 tensor, no grad. The CPU's state (turbo, throttling,
other jobs) moves every timing; divide by it to compare numbers from different days.

Every benchmark's result gets ``peak_rss_mb``, the process's peak resident memory while it ran (the peak is
reset before each one where Linux allows it, `reset_peak_rss`); the animate benchmark also reports it per case.
``personalize`` (peak memory of `metaportrait personalize` on a short built-in clip, in a child process) is
slower and runs only when asked for: ``--only personalize``. ``--cases`` limits the animate benchmark's cases.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import resource
import statistics
import time
from pathlib import Path

import torch

from metaportrait.cli.arguments import positive_int
from metaportrait.errors import InputError
from metaportrait.io.atomic import write_text_atomic

logger = logging.getLogger(__name__)

# name -> script in benchmarks/, in running order
BENCHMARKS: dict[str, str] = {
    "frontend": "bench_frontend.py",
    "identity": "bench_identity.py",
    "model": "bench_model.py",
    "step": "bench_step.py",
    "animate": "bench_animate.py",
    "sr": "bench_sr.py",
    "personalize": "bench_personalize.py",
}
ON_REQUEST = ("personalize",)  # run only when named with --only


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package was imported from (src/metaportrait/cli -> repo)."""
    return Path(__file__).resolve().parents[3] / "benchmarks"


def load_benchmark(name: str):
    """Import one benchmark script as a module (it is not part of the package)."""
    path = benchmarks_dir() / BENCHMARKS[name]
    if not path.is_file():
        raise InputError(path, "benchmark script not found; `metaportrait bench` runs from a source checkout")
    spec = importlib.util.spec_from_file_location(f"metaportrait_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise InputError(path, "defines no run() function")
    return module


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux: ``/proc/self/clear_refs``); False where that fails."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` (what `reset_peak_rss` resets), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_ms(threads: int, repeats: int = 5) -> float:
    """Median milliseconds of the reference workload (see the module docstring) on ``threads`` threads."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    convolutions = [torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(10)]
    x = torch.rand(1, 64, 128, 128, generator=generator)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up
            begin = time.perf_counter()
            y = x
            for convolution in convolutions:
                y = torch.relu(convolution(y))
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times[1:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="CPU threads for torch (and the benchmarks' own pools)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", default=None,
                        help=f"run only this benchmark (repeatable); {', '.join(ON_REQUEST)} runs only when named")
    parser.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                        help="the animate benchmark's cases to run (default all: clip_256 large_1024 "
                             "large_1024_compiled scripted clip_256_onnx clip_256_bf16 clip_256_compiled clip_256_sr "
                             "clip_256_sr_compiled)")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="frames per case of the benchmarks that take a frame count (default: each one's own)")
    parser.add_argument("--driving", type=Path, default=None,
                        help="driving video for the animate benchmark (default: a built-in scripted clip)")
    parser.add_argument("--output", "-o", type=Path, default=None, help="also write the JSON object to this file")


def run(args: argparse.Namespace) -> int:
    if args.driving is not None and not args.driving.is_file():
        raise InputError(args.driving, "file not found")
    if args.output is not None and not args.output.parent.is_dir():
        raise InputError(args.output, "output folder does not exist")
    names = [name for name in BENCHMARKS if (name in args.only if args.only else name not in ON_REQUEST)]
    modules = {name: load_benchmark(name) for name in names}  # all scripts load before any long measurement
    if getattr(args, "cases", None) and "animate" in modules:
        unknown = sorted(set(args.cases) - set(modules["animate"].CASES))
        if unknown:
            known = ", ".join(modules["animate"].CASES)
            raise InputError("--cases", f"unknown animate case {unknown[0]!r}; known: {known}")
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "reference_ms": {"before": reference_ms(args.threads)}}
    for name, module in modules.items():
        logger.info("benchmark %s ...", name)
        start = time.perf_counter()
        accepted = inspect.signature(module.run).parameters
        options = {key: value for key, value in (("frames", args.frames), ("driving", args.driving),
                                                 ("cases", getattr(args, "cases", None)))
                   if value is not None and key in accepted}
        scope = "this benchmark" if reset_peak_rss() else "the process so far"
        results[name] = module.run(threads=args.threads, **options)
        if isinstance(results[name], dict):
            results[name].setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
            results[name].setdefault("peak_rss_scope", scope)
        logger.info("benchmark %s done in %.1f s", name, time.perf_counter() - start)
    results["reference_ms"]["after"] = reference_ms(args.threads)
    text = json.dumps(results, indent=2)
    if args.output is not None:
        write_text_atomic(args.output, text + "\n")
    print(text)
    return 0
