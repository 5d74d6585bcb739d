"""Model checkpoints: a folder with ``model.safetensors`` (weights) and ``config.json`` (the `ModelConfig`).

Loading rebuilds the generator from the stored config, so it never asks for architecture flags. Both files are
written under temporary names in the same folder and renamed into place, so an interrupted save never leaves a
half-written checkpoint. Training state (optimisers, step) is the trainer's business and lives elsewhere.
"""

from __future__ import annotations

import hashlib

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaportrait.config import ModelConfig
from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_path, write_text_atomic

FORMAT_NAME = "metaportrait-generator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_model(
    path_dir: str | Path,
    generator: torch.nn.Module,
    cfg: ModelConfig,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``generator``'s weights and ``cfg`` into the folder ``path_dir`` (created if needed).

    Args:
        generator: a `metaportrait.models.generator.Generator` built from ``cfg``.
        extra_meta: JSON-safe facts to keep beside the config (training step, data, ...), under ``"meta"``.
    Returns:
        The folder path.
    """
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "meta": extra_meta or {},
    }
    text = json.dumps(document, indent=2, sort_keys=True)  # fails here, before writing, if extra_meta is not JSON-safe
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT_NAME})
    write_text_atomic(path_dir / CONFIG_FILE, text + "\n")
    return path_dir


def load_config(path_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read ``config.json`` of a checkpoint folder: ``(ModelConfig, extra_meta)``."""
    path = Path(path_dir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(path, "checkpoint config not found (expected a folder written by save_model)")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if document.get("format") != FORMAT_NAME:
        raise InputError(path, f"not a {FORMAT_NAME} checkpoint (format={document.get('format')!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError(
            path, f"checkpoint format version {document.get('format_version')} is not supported (need {FORMAT_VERSION})"
        )
    try:
        cfg = ModelConfig.from_dict(document["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(path, f"invalid model config: {e}") from e
    return cfg, document.get("meta", {})


def load_model(path_dir: str | Path):
    """Rebuild the generator saved by `save_model`: returns ``(Generator, ModelConfig)``, in eval mode.

    Weights are loaded strictly (every key and shape must match the stored config's architecture).
    """
    from metaportrait.models.generator import Generator  # io may not import models at module level (layering)

    cfg, _ = load_config(path_dir)
    weights = Path(path_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(weights, "checkpoint weights not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:  # truncated or not a safetensors file at all
        raise InputError(weights, f"cannot read the weights (corrupted or not a safetensors file: {e})") from None
    generator = Generator(cfg)
    expected = generator.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        # Typically weights of another preset (or width) than the config.json beside them describes.
        details = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
        first = (wrong or missing or unexpected)[0]
        raise InputError(weights, f"weights do not match the model in {CONFIG_FILE} ({details}, e.g. {first!r}); "
                                  "are they from a checkpoint of another preset?")  # fmt: skip
    generator.load_state_dict(state, strict=True)
    return generator.eval(), cfg


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint's weights: the file itself, or ``model.safetensors`` inside a folder."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise InputError(path, "checkpoint weights not found")
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weight_file(path: str | Path, expected: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``-d state dict (name -> tensor), read with ``weights_only=True``.

    Args:
        path: the file.
        expected: which file this should be, for the error message (e.g. ``alexnet-owt-7be5be79.pth``).

    Raises:
        InputError: the file is missing, unreadable, or not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"file not found (expected {expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # The file is user input and torch.load's failures on foreign bytes are undocumented and varied (KeyError
        # for text, EOFError for an empty file, RuntimeError for a truncated zip, UnpicklingError for pickled
        # objects): all of them mean "not a weights file", reported in one line.
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise InputError(path, f"not a PyTorch weights file ({type(error).__name__}: {detail}); "
                               f"expected {expected}") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(path, f"not a state dict (a dict of name -> tensor); expected {expected}")
    return state
