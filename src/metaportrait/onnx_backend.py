"""ONNX Runtime backend for the generator's per-frame work, a drop-in for `Generator` inside `Animator`.

::

    animator = Animator.from_pretrained(backend="onnx")   # exported on first use, cached per checkpoint

The per-frame part of `Generator.forward` (warping network, warp, refinement decoder; the source's feature pyramid
comes in precomputed, `Generator.encode_source`) is exported with ``torch.onnx.export(dynamo=True)`` with a dynamic
batch, to ``<folder>/generator.onnx`` beside ``<folder>/onnx.json``, which records the checkpoint's SHA-256 so a
folder exported from another checkpoint is refused. Source-only work (feature pyramid, source flow) stays in
torch: it runs once per portrait. Inputs and outputs are those of `Generator.forward` (shapes and ranges there);
the outputs are ``output``, ``occlusion`` and ``deformation``, all the pipeline reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from metaportrait.config import ModelConfig
from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_folder
from metaportrait.models.generator import Generator, example_inputs

ONNX_FILE, META_FILE = "generator.onnx", "onnx.json"
OUTPUTS = ("output", "occlusion", "deformation")
MAX_LEVELS = 8  # feature-pyramid levels the exported signature has room for
OPSET = 18


def default_cache(checkpoint_sha256: str) -> Path:
    """``$XDG_CACHE_HOME/metaportrait/onnx/<first 16 hex of the checkpoint's SHA-256>`` (``~/.cache`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "metaportrait" / "onnx" / checkpoint_sha256[:16]


class _PerFrame(torch.nn.Module):
    """`Generator.forward` with batch-1 source inputs, batch-B driving inputs and the feature pyramid as inputs.

    Named level arguments, not a list: the exporter's dynamic shapes do not take a variable number of tensors.
    """

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, source, source_lines, driving_lines, identity, prior_grid, prior_masks,
                level0, level1=None, level2=None, level3=None, level4=None, level5=None, level6=None, level7=None):
        levels = [x for x in (level0, level1, level2, level3, level4, level5, level6, level7) if x is not None]
        count = driving_lines.shape[0]
        result = self.generator(
            source.expand(count, -1, -1, -1), source_lines.expand(count, -1, -1, -1), driving_lines,
            identity=None if identity is None else identity.expand(count, -1), prior_grid=prior_grid,
            prior_masks=prior_masks, source_levels=levels,
        )
        return tuple(result[name] for name in OUTPUTS)


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
    with atomic_folder(folder) as staging, torch.no_grad():
        torch.onnx.export(_PerFrame(generator), (), str(staging / ONNX_FILE), kwargs=args, dynamo=True,
                          dynamic_shapes=dynamic, opset_version=OPSET, verbose=False,
                          output_names=list(OUTPUTS))
        meta = {"checkpoint_sha256": checkpoint_sha256, "torch": torch.__version__, "opset": OPSET,
                "levels": len(levels), "inputs": [name for name, value in args.items() if value is not None]}
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
    """Runs the exported per-frame step with ONNX Runtime; source-only methods delegate to the torch generator.

    Raises:
        InputError: the folder is incomplete or corrupt, or was exported from another checkpoint.
    """

    def __init__(self, generator: Generator, folder: str | Path, checkpoint_sha256: str, threads: int | None = None):
        import onnxruntime

        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            exported_from = meta["checkpoint_sha256"]
            self._inputs = list(meta["inputs"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(folder, f"not an ONNX export of this project ({META_FILE}: {error})") from None
        if exported_from != checkpoint_sha256:
            raise InputError(folder, "ONNX export of another checkpoint (its weights' SHA-256 differs); re-export")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self._session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), options,
                                                         providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for a bad file
            raise InputError(folder / ONNX_FILE, f"cannot be loaded by ONNX Runtime ({error})") from None
        self.torch_generator = generator.eval()
        self.cfg = generator.cfg

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


def onnx_generator(generator: Generator, config: ModelConfig, checkpoint_sha256: str,
                   folder: str | Path | None = None) -> OnnxGenerator:
    """The ONNX backend for a loaded checkpoint: its export in ``folder`` (default: `default_cache`), made first if
    the folder does not exist."""
    check_exportable(config)
    folder = Path(folder) if folder is not None else default_cache(checkpoint_sha256)
    if not folder.exists():
        export(generator, config, folder, checkpoint_sha256)
    return OnnxGenerator(generator, folder, checkpoint_sha256)
