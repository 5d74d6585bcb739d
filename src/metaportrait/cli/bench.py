"""`metaportrait bench`: run the speed benchmarks in the repository's ``benchmarks/`` folder, print one JSON object.

The benchmark scripts live beside the package in a source checkout (they read the shared test data and are not
installed), so this command works from a checkout (``pip install -e .``, as ``make`` does). Each script defines
``run(threads=...) -> dict``; the output is ``{"threads": N, "<name>": <that dict>, ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from metaportrait.cli.arguments import positive_int
from metaportrait.errors import InputError

logger = logging.getLogger(__name__)

# name -> script in benchmarks/, in running order
BENCHMARKS: dict[str, str] = {
    "frontend": "bench_frontend.py",
    "identity": "bench_identity.py",
    "model": "bench_model.py",
    "animate": "bench_animate.py",
    "sr": "bench_sr.py",
}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="CPU threads for torch (and the benchmarks' own pools)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", default=None,
                        help="run only this benchmark (repeatable)")


def run(args: argparse.Namespace) -> int:
    names = [name for name in BENCHMARKS if args.only is None or name in args.only]
    modules = {name: load_benchmark(name) for name in names}  # all scripts load before any long measurement
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads}
    for name, module in modules.items():
        logger.info("benchmark %s ...", name)
        start = time.perf_counter()
        results[name] = module.run(threads=args.threads)
        logger.info("benchmark %s done in %.1f s", name, time.perf_counter() - start)
    print(json.dumps(results, indent=2))
    return 0
