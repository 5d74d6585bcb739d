"""ONNX Runtime backend for the generator's per-frame work, a drop-in for `Generator` inside `Animator`.

::

    animator = Animator.from_pretrained(backend="onnx")   # exported on first use, cached per checkpoint

The generator is exported in two parts with ``torch.onnx.export(dynamo=True)``: the per-frame part of
`Generator.forward` (warping network, warp, refinement decoder; the source's feature pyramid comes in
precomputed), with a dynamic batch, to ``<folder>/generator.onnx``, and the source-only part
(`Generator.encode_source`, run once per portrait) to ``<folder>/source.onnx``, beside ``<folder>/onnx.json``,
which records the checkpoint's SHA-256 so a folder exported from another checkpoint is refused (an older export
without ``source.onnx`` runs that part in torch). Inputs and outputs are those of `Generator.forward` (shapes and
ranges there); the outputs are ``output``, ``occlusion`` and ``deformation``, all the pipeline reads.

The super-resolution network (`metaportrait.models.sr.TemporalSR`) is exported the same way, with a dynamic
number of frames, to ``<folder>/sr.onnx`` beside its own ``onnx.json`` (`export_sr`, `OnnxSR`): ``animate --sr
--backend onnx`` runs both networks in ONNX Runtime. ``metaportrait export-onnx`` writes both into one folder
(the SR export in its ``sr/`` subfolder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from metaportrait.config import ModelConfig
from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_folder
from metaportrait.models.generator import Generator, example_inputs

ONNX_FILE, SOURCE_FILE, SR_FILE, META_FILE = "generator.onnx", "source.onnx", "sr.onnx", "onnx.json"
SR_FOLDER = "sr"  # the SR export's subfolder of an `export-onnx` folder
SR_MIN_FRAMES = 3  # the SR export takes clips of at least this many frames (shorter ones run in torch)
OUTPUTS = ("output", "occlusion", "deformation")
MAX_LEVELS = 8  # feature-pyramid levels the exported signature has room for
OPSET = 18


def default_cache(checkpoint_sha256: str) -> Path:
    """``$XDG_CACHE_HOME/metaportrait/onnx/<first 16 hex of the checkpoint's SHA-256>`` (``~/.cache`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "metaportrait" / "onnx" / checkpoint_sha256[:16]


class PerFrame(torch.nn.Module):
    """`Generator.forward` with batch-1 source inputs, batch-B driving inputs and the feature pyramid as inputs,
    returning `OUTPUTS` in float32; under bf16 autocast with ``precision="bf16"`` (the compiled backend's).

    Named level arguments, not a list: the exporter's dynamic shapes do not take a variable number of tensors.
    """

    def __init__(self, generator: Generator, precision: str = "fp32"):
        super().__init__()
        self.generator = generator
        self.bf16 = precision == "bf16"

    def forward(self, source, source_lines, driving_lines, identity, prior_grid, prior_masks,
                level0, level1=None, level2=None, level3=None, level4=None, level5=None, level6=None, level7=None):
        levels = [x for x in (level0, level1, level2, level3, level4, level5, level6, level7) if x is not None]
        count = driving_lines.shape[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            result = self.generator(
                source.expand(count, -1, -1, -1), source_lines.expand(count, -1, -1, -1), driving_lines,
                identity=None if identity is None else identity.expand(count, -1), prior_grid=prior_grid,
                prior_masks=prior_masks, source_levels=levels,
            )
        return tuple(result[name].float() for name in OUTPUTS)


class _SourceEncoder(torch.nn.Module):
    """`Generator.encode_source` as a module: ``(1, 3, S, S)`` in [0, 1] -> the feature levels, coarsest first."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, source):
        return tuple(self.generator.encode_source(source))


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The exporters' and compilers' notes (graph passes, an operator run through a fallback, deprecations) are
    for torch's developers, not for a user waiting for an export: keep them out of the log."""
    loggers = [logging.getLogger(name) for name in ("torch._inductor", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_exportable(config: ModelConfig) -> None:
    """Raises ValueError unless ``config`` is a model the export backends cover (ONNX, compiled)."""
    if config.warp.subtract_source_flow or config.refine.gaze_heatmap or config.refine.mouth_line:
        raise ValueError("the ONNX and compiled backends cover MediaPipe-landmark models without source-flow "
                         "subtraction (the official preset's keypoint inputs are not exported)")


def export(generator: Generator, config: ModelConfig, folder: str | Path, checkpoint_sha256: str) -> Path:
    """Export ``generator``'s per-frame step to ``folder`` (written whole or not at all); returns the folder."""
    check_exportable(config)
    generator = generator.eval()
    inputs = example_inputs(config, batch=2)
    with torch.no_grad():
        levels = generator.encode_source(inputs["source"][:1])
    if len(levels) > MAX_LEVELS:
        raise ValueError(f"{len(levels)} feature levels; the ONNX signature has room for {MAX_LEVELS}")
    args = {"source": inputs["source"][:1], "source_lines": inputs["source_lines"][:1],
            "driving_lines": inputs["driving_lines"], "identity": inputs.get("identity", torch.empty(0))[:1],
            "prior_grid": inputs.get("prior_grid"), "prior_masks": inputs.get("prior_masks"),
            **{f"level{i}": level for i, level in enumerate(levels)}}
    if not config.use_identity:
        args["identity"] = None
    batch = torch.export.Dim("batch", min=1, max=256)
    per_frame = {"driving_lines", "prior_grid", "prior_masks"}
    dynamic = {name: ({0: batch} if name in per_frame and value is not None else None) for name, value in args.items()}
    folder = Path(folder)
    with atomic_folder(folder) as staging, torch.no_grad(), quiet_export():
        torch.onnx.export(PerFrame(generator).eval(), (), str(staging / ONNX_FILE), kwargs=args, dynamo=True,
                          dynamic_shapes=dynamic, opset_version=OPSET, verbose=False,
                          output_names=list(OUTPUTS))
        torch.onnx.export(_SourceEncoder(generator).eval(), (args["source"],), str(staging / SOURCE_FILE), dynamo=True,
                          opset_version=OPSET, verbose=False, input_names=["source"],
                          output_names=[f"level{i}" for i in range(len(levels))])
        meta = {"checkpoint_sha256": checkpoint_sha256, "torch": torch.__version__, "opset": OPSET,
                "levels": len(levels), "inputs": [name for name, value in args.items() if value is not None],
                "source_encoder": SOURCE_FILE}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


class SourceInTorch:
    """What an exported generator keeps in torch: the source-only methods, run once per portrait by the generator
    it was made from (``torch_generator``), and its config (``cfg``)."""

    torch_generator: Generator
    cfg: ModelConfig

    def eval(self):
        return self

    def encode_source(self, source: torch.Tensor) -> list[torch.Tensor]:
        return self.torch_generator.encode_source(source)

    def source_flow(self, source: torch.Tensor, source_lines: torch.Tensor) -> torch.Tensor:
        return self.torch_generator.source_flow(source, source_lines)


class OnnxGenerator(SourceInTorch):
    """Runs the exported generator with ONNX Runtime: the per-frame step, and the source's feature pyramid when
    the folder has it (older exports: in torch); the source flow stays in torch.

    Raises:
        InputError: the folder is incomplete or corrupt, or was exported from another checkpoint.
    """

    def __init__(self, generator: Generator, folder: str | Path, checkpoint_sha256: str, threads: int | None = None):
        folder = Path(folder)
        meta = _export_meta(folder, checkpoint_sha256, "checkpoint", ("inputs",))
        self._inputs = list(meta["inputs"])
        self._session = _session(folder / ONNX_FILE, threads)
        # The source-only part: in ONNX Runtime when exported (since 2026-12-07), else in torch.
        self._source_session = _session(folder / SOURCE_FILE, threads) if meta.get("source_encoder") else None
        self.torch_generator = generator.eval()
        self.cfg = generator.cfg

    def encode_source(self, source: torch.Tensor) -> list[torch.Tensor]:
        if self._source_session is None:
            return self.torch_generator.encode_source(source)
        feed = {"source": np.ascontiguousarray(source.detach().numpy(), dtype=np.float32)}
        return [torch.from_numpy(level) for level in self._source_session.run(None, feed)]

    def __call__(self, source, source_lines, driving_lines, identity=None, prior_grid=None, prior_masks=None,
                 source_flow=None, source_levels=None) -> dict[str, torch.Tensor]:
        """As `Generator.forward` (batch-1 or batch-B source inputs); returns ``output``, ``occlusion``,
        ``deformation``."""
        if source_flow is not None:
            raise ValueError("the ONNX backend does not take a source flow")
        if source_levels is None:
            source_levels = self.encode_source(source[:1])
        given = {"source": source[:1], "source_lines": source_lines[:1], "driving_lines": driving_lines,
                 "identity": None if identity is None else identity[:1], "prior_grid": prior_grid,
                 "prior_masks": prior_masks, **{f"level{i}": level[:1] for i, level in enumerate(source_levels)}}
        feed = {name: np.ascontiguousarray(given[name].detach().numpy(), dtype=np.float32) for name in self._inputs}
        outputs = self._session.run(list(OUTPUTS), feed)
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUTS, outputs)}


def _export_meta(folder: Path, checkpoint_sha256: str, what: str, keys: tuple[str, ...] = ()) -> dict:
    """The ``onnx.json`` of an export folder, checked to hold ``keys`` and to come from ``checkpoint_sha256``.

    Raises:
        InputError: no readable metadata there, or an export of another ``what`` (e.g. "checkpoint").
    """
    try:
        meta = json.loads((folder / META_FILE).read_text())
        exported_from = meta["checkpoint_sha256"]
        missing = [key for key in keys if key not in meta]
        if missing:
            raise KeyError(missing[0])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(folder, f"not an ONNX export of this project ({META_FILE}: {error})") from None
    if exported_from != checkpoint_sha256:
        raise InputError(folder, f"ONNX export of another {what} (its weights' SHA-256 differs); re-export")
    return meta


def _session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session for the model file ``path``, ``threads`` intra-op threads (default torch's).

    Raises:
        InputError: the file cannot be loaded.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for a bad file
        raise InputError(path, f"cannot be loaded by ONNX Runtime ({error})") from None


def export_sr(model: torch.nn.Module, folder: str | Path, checkpoint_sha256: str) -> Path:
    """Export the SR network (`TemporalSR`: ``(T, 3, S, S)`` in [0, 1] -> ``(T, 3, 2S, 2S)`` in [0, 1]) with a
    dynamic number of frames, ``T >= SR_MIN_FRAMES`` (the edge replication of its temporal window makes two frames
    a special case for the exporter), to ``folder`` (written whole or not at all); returns the folder."""
    model = model.eval()
    cfg = model.cfg
    frames = torch.rand(5, 3, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))
    folder = Path(folder)
    with atomic_folder(folder) as staging, torch.no_grad(), quiet_export():
        torch.onnx.export(model, (frames,), str(staging / SR_FILE), dynamo=True, opset_version=OPSET, verbose=False,
                          input_names=["frames"], output_names=["upscaled"],
                          dynamic_shapes={"frames": {0: torch.export.Dim("frames", min=SR_MIN_FRAMES, max=256)}})
        meta = {"checkpoint_sha256": checkpoint_sha256, "torch": torch.__version__, "opset": OPSET,
                "input_size": cfg.input_size, "output_size": cfg.output_size,
                "temporal_layers": model.num_temporal_layers()}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


class OnnxSR:
    """The exported SR network in ONNX Runtime, a drop-in for `TemporalSR` in `metaportrait.upscale.StreamingSR`.

    Raises:
        InputError: the folder is incomplete or corrupt, or was exported from another checkpoint.
    """

    def __init__(self, model: torch.nn.Module, folder: str | Path, checkpoint_sha256: str, threads: int | None = None):
        folder = Path(folder)
        _export_meta(folder, checkpoint_sha256, "SR checkpoint")
        self._session = _session(folder / SR_FILE, threads)
        self.torch_model = model.eval()  # for clips shorter than SR_MIN_FRAMES (a video of one or two frames)
        self.cfg = model.cfg
        self._temporal_layers = model.num_temporal_layers()

    def eval(self) -> OnnxSR:
        return self

    def num_temporal_layers(self) -> int:
        return self._temporal_layers

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if len(frames) < SR_MIN_FRAMES:
            with torch.no_grad():
                return self.torch_model(frames)
        feed = {"frames": np.ascontiguousarray(frames.detach().numpy(), dtype=np.float32)}
        return torch.from_numpy(self._session.run(None, feed)[0])


def onnx_sr(model: torch.nn.Module, checkpoint_sha256: str, folder: str | Path | None = None) -> OnnxSR:
    """The SR network in ONNX Runtime: its export in ``folder`` (default: `default_cache` of its weights), made
    first if the folder does not exist."""
    folder = Path(folder) if folder is not None else default_cache(checkpoint_sha256)
    if not folder.exists():
        export_sr(model, folder, checkpoint_sha256)
    return OnnxSR(model, folder, checkpoint_sha256)


def onnx_generator(generator: Generator, config: ModelConfig, checkpoint_sha256: str,
                   folder: str | Path | None = None) -> OnnxGenerator:
    """The ONNX backend for a loaded checkpoint: its export in ``folder`` (default: `default_cache`), made first if
    the folder does not exist."""
    check_exportable(config)
    folder = Path(folder) if folder is not None else default_cache(checkpoint_sha256)
    if not folder.exists():
        export(generator, config, folder, checkpoint_sha256)
    return OnnxGenerator(generator, folder, checkpoint_sha256)
