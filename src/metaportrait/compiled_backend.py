"""The ``compiled`` backend: the generator's per-frame step compiled ahead of time by AOT Inductor (C++).

::

    animator = Animator.from_pretrained(backend="compiled")   # compiled on first use, cached per checkpoint

In eager mode about half of the lite generator's time at 256² goes to the element-wise work between its
convolutions (resizes, casts, products, sums, concatenations); Inductor fuses it into generated C++. The per-frame
part of `Generator.forward` (as the ONNX backend's, `metaportrait.onnx_backend`) is exported with
``torch.export`` for one batch size and one precision (bf16 autocast is compiled in) and built with
``torch._inductor.aoti_compile_and_package`` into ``<folder>/generator.pt2`` beside ``<folder>/compiled.json``
(checkpoint SHA-256, batch, precision, torch version). Building takes about a minute on a 2-core machine and
needs a C++ compiler (``g++``); loading it afterwards takes milliseconds. Every call has the compiled batch,
`CompiledGenerator.fixed_batch`: `Animator` pads short batches. Source-only work (feature pyramid) stays in
eager torch, once per portrait. Measured in docs/results.md ("Compiled generator").

With ``--sr`` the SR network's `TemporalSR.finish` (decoder, detail body, residual: most of its time) is compiled
the same way for `StreamingSR`'s calls (``<folder>/sr_finish.pt2``, folders named ``sr-...``), and
`metaportrait.models.sr.SRStream` uses it for calls of that size; the U-Net, whose temporal layers keep state
between calls, stays eager (docs/results.md, "Super-resolution").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from metaportrait.config import ModelConfig, Precision
from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_folder
from metaportrait.models.generator import Generator, example_inputs
from metaportrait.models.sr import SRStream, TemporalSR
from metaportrait.onnx_backend import OUTPUTS, PerFrame, SourceInTorch, check_exportable, quiet_export

PACKAGE_FILE, SR_PACKAGE_FILE, META_FILE = "generator.pt2", "sr_finish.pt2", "compiled.json"
# How builds are made; a build of another recipe is rebuilt. 2 (2026-12-07): `grid_sample` calls ATen's kernel.
RECIPE = 2

logger = logging.getLogger(__name__)


def default_cache(checkpoint_sha256: str, batch: int, precision: Precision, kind: str = "") -> Path:
    """``$XDG_CACHE_HOME/metaportrait/compiled/<kind><first 16 hex of the SHA-256>-b<batch>-<precision>-torch<version>``
    ``-r<RECIPE>`` (``~/.cache`` by default): a build serves one checkpoint, batch, precision, torch version and
    build recipe (``kind``: ``""`` the generator, ``"sr-"`` the SR network's finish)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    version = torch.__version__.replace("+", "_")
    name = f"{kind}{checkpoint_sha256[:16]}-b{batch}-{precision}-torch{version}-r{RECIPE}"
    return root / "metaportrait" / "compiled" / name


def build(generator: Generator, config: ModelConfig, folder: str | Path, checkpoint_sha256: str, batch: int,
          precision: Precision) -> Path:
    """Compile ``generator``'s per-frame step for ``batch`` frames into ``folder`` (written whole or not at all).

    Raises:
        InputError: AOT Inductor could not build it (no C++ compiler, for example).
    """
    check_exportable(config)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' here, got {precision!r}")
    generator = generator.eval()
    inputs = example_inputs(config, batch=batch)
    with torch.no_grad():
        levels = generator.encode_source(inputs["source"][:1])
    identity = inputs["identity"][:1] if config.use_identity else None
    args = (inputs["source"][:1], inputs["source_lines"][:1], inputs["driving_lines"], identity,
            inputs.get("prior_grid"), inputs.get("prior_masks"), *levels)
    meta = {"checkpoint_sha256": checkpoint_sha256, "batch": batch, "precision": precision,
            "torch": torch.__version__, "recipe": RECIPE, "levels": len(levels)}
    return _compile(PerFrame(generator, precision), args, folder, PACKAGE_FILE, meta, "generator")


def _compile(module: torch.nn.Module, args: tuple, folder: str | Path, package: str, meta: dict, what: str) -> Path:
    """Export ``module`` on ``args`` and build it into ``folder / package`` with ``meta`` beside it (`META_FILE`),
    the folder written whole or not at all.

    Raises:
        InputError: AOT Inductor could not build it (no C++ compiler, for example).
    """
    folder = Path(folder)
    with atomic_folder(folder) as staging, torch.no_grad():
        try:
            with quiet_export(), _aten_grid_sample():
                program = torch.export.export(module.eval(), args)
                torch._inductor.aoti_compile_and_package(program, package_path=str(staging / package))
        except Exception as error:  # noqa: BLE001 - Inductor fails with many types; one line for the user
            text = str(error).strip()
            problem = text.splitlines()[0][:200] if text else type(error).__name__
            raise InputError("--backend compiled", f"the {what} could not be compiled ({problem}); it needs a "
                             "C++ compiler (g++), or use --backend torch") from None
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


@contextlib.contextmanager
def _aten_grid_sample() -> Iterator[None]:
    """Inductor rewrites `grid_sample` into generated loops, and when the sampling grid is itself resized it
    fuses the resize in, recomputed for every channel: 8 of the lite generator's 20 ms a frame (batch 4, bf16).
    ATen's kernel does the same sampling in 0.6 ms: while this is active, the op is left to it. Inductor reads
    its decompositions from a table and from a copy made at its first compilation in the process: both lose it.
    The fallback to ATen is registered here, not left implicit: Inductor's implicit fallback refuses an op that
    has a decomposition whenever the environment variable ``CI`` is set (as on CI runners)."""
    from torch._inductor import decomposition as decompositions, lowering  # Inductor is heavy: only when building
    tables = (decompositions.decompositions, decompositions.fast_random_decomps())
    op = torch.ops.aten.grid_sampler_2d.default
    saved = [table.pop(op, None) for table in tables]
    saved_lowering, was_fallback = lowering.lowerings.get(op), op in lowering.fallbacks
    try:
        lowering.make_fallback(op, warn=False)
        yield
    finally:
        if saved_lowering is None:
            lowering.lowerings.pop(op, None)
        else:
            lowering.lowerings[op] = saved_lowering
        if not was_fallback:
            lowering.fallbacks.discard(op)
        for table, decomposition in zip(tables, saved):
            if decomposition is not None:
                table[op] = decomposition


def _load(folder: str | Path, package: str, checkpoint_sha256: str, batch: int, precision: Precision):
    """The compiled module in ``folder``, checked against what the caller needs.

    Raises:
        InputError: the folder is incomplete or corrupt, or was built from another checkpoint, batch, precision or
            torch version.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        built = (meta["checkpoint_sha256"], meta["batch"], meta["precision"], meta["torch"], meta.get("recipe", 1))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(folder, f"not a compiled network of this project ({META_FILE}: {error})") from None
    wanted = (checkpoint_sha256, batch, precision, torch.__version__, RECIPE)
    if built != wanted:
        names = ("checkpoint", "batch", "precision", "torch version", "build recipe")
        differs = [name for name, a, b in zip(names, built, wanted) if a != b]
        raise InputError(folder, f"compiled for another {' and '.join(differs)}; remove the folder to rebuild")
    try:
        return torch._inductor.aoti_load_package(str(folder / package))
    except Exception as error:  # noqa: BLE001 - the loader raises its own types for a bad file
        raise InputError(folder / package, f"cannot be loaded ({str(error).strip()[:200]})") from None


class CompiledGenerator(SourceInTorch):
    """Runs the compiled per-frame step on batches of `fixed_batch`; source-only methods delegate to torch.

    Raises:
        InputError: the folder is incomplete or corrupt, or was built from another checkpoint, batch, precision
            or torch version.
    """

    def __init__(self, generator: Generator, folder: str | Path, checkpoint_sha256: str, batch: int,
                 precision: Precision):
        self._run = _load(folder, PACKAGE_FILE, checkpoint_sha256, batch, precision)
        self.torch_generator = generator.eval()
        self.cfg = generator.cfg
        self.fixed_batch = batch
        self.precision = precision

    def __call__(self, source, source_lines, driving_lines, identity=None, prior_grid=None, prior_masks=None,
                 source_flow=None, source_levels=None) -> dict[str, torch.Tensor]:
        """As `Generator.forward` with ``fixed_batch`` driving frames (batch-1 or batch-B source inputs); returns
        ``output``, ``occlusion``, ``deformation``."""
        if source_flow is not None:
            raise ValueError("the compiled backend does not take a source flow")
        if driving_lines.shape[0] != self.fixed_batch:
            raise ValueError(f"compiled for batches of {self.fixed_batch}, got {driving_lines.shape[0]}")
        if source_levels is None:
            source_levels = self.encode_source(source[:1])
        with torch.no_grad():
            outputs = self._run(
                source[:1].contiguous(), source_lines[:1].contiguous(), driving_lines.contiguous(),
                None if identity is None else identity[:1].contiguous(), prior_grid, prior_masks,
                *[level[:1].contiguous() for level in source_levels],
            )
        return dict(zip(OUTPUTS, outputs))


def compiled_generator(generator: Generator, config: ModelConfig, checkpoint_sha256: str, batch: int,
                       precision: Precision, folder: str | Path | None = None) -> CompiledGenerator:
    """The compiled backend for a loaded checkpoint: its build in ``folder`` (default: `default_cache`), made first
    if the folder does not exist."""
    check_exportable(config)
    folder = Path(folder) if folder is not None else default_cache(checkpoint_sha256, batch, precision)
    if not folder.exists():
        logger.info("compiling the generator for batches of %d in %s (once per checkpoint, about a minute) into %s",
                    batch, precision, folder)
        build(generator, config, folder, checkpoint_sha256, batch, precision)
    return CompiledGenerator(generator, folder, checkpoint_sha256, batch, precision)


# --- the SR network ---------------------------------------------------------------------------------------------


class _Finish(torch.nn.Module):
    """`TemporalSR.finish` with the conditions as trailing arguments, float32 out; bf16 autocast compiled in."""

    def __init__(self, model: TemporalSR, precision: Precision):
        super().__init__()
        self.model = model
        self.bf16 = precision == "bf16"

    def forward(self, latent, finest, windows, frames, *conditions):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.finish(latent, list(conditions), finest, windows, frames).float()


def _finish_arguments(model: TemporalSR, batch: int, precision: Precision) -> tuple:
    """What `SRStream` hands `TemporalSR.finish` for ``batch`` frames (dtypes as under ``precision``), as
    `_Finish`'s contiguous arguments: taken from a stream of random frames."""
    taken: list[tuple] = []

    def capture(latent, conditions, finest, windows, frames):
        taken.append((latent, finest, windows, frames, *conditions))
        return model.finish(latent, conditions, finest, windows, frames)

    capture.fixed_batch = batch
    size = model.cfg.input_size
    stream = SRStream(model, finish=capture)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        while not taken:
            stream.push(torch.rand(batch, 3, size, size))
    return tuple(argument.contiguous() for argument in taken[0])


class CompiledSRFinish:
    """The compiled `TemporalSR.finish` (decoder, detail body, residual: most of the SR network's time) for batches
    of `fixed_batch` frames, for `SRStream`'s ``finish``."""

    def __init__(self, folder: str | Path, checkpoint_sha256: str, batch: int, precision: Precision):
        self._run = _load(folder, SR_PACKAGE_FILE, checkpoint_sha256, batch, precision)
        self.fixed_batch = batch

    def __call__(self, latent, conditions, finest, windows, frames) -> torch.Tensor:
        with torch.no_grad():
            return self._run(latent.contiguous(), finest.contiguous(), windows.contiguous(), frames.contiguous(),
                             *[condition.contiguous() for condition in conditions])


def compiled_sr_finish(model: TemporalSR, checkpoint_sha256: str, batch: int, precision: Precision,
                       folder: str | Path | None = None) -> CompiledSRFinish | None:
    """The compiled finish of a loaded SR network (built first into ``folder``, default `default_cache`, if that
    does not exist), or None for a network without a detail body (nothing there worth compiling)."""
    if not model.cfg.detail_channels:
        return None
    folder = Path(folder) if folder is not None else default_cache(checkpoint_sha256, batch, precision, "sr-")
    if not folder.exists():
        logger.info("compiling the SR network's finish for batches of %d in %s (once per checkpoint) into %s",
                    batch, precision, folder)
        meta = {"checkpoint_sha256": checkpoint_sha256, "batch": batch, "precision": precision,
                "torch": torch.__version__, "recipe": RECIPE}
        _compile(_Finish(model.eval(), precision), _finish_arguments(model.eval(), batch, precision), folder,
                 SR_PACKAGE_FILE, meta, "SR network")
    return CompiledSRFinish(folder, checkpoint_sha256, batch, precision)
