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

from metaportrait.config import ModelConfig, SRConfig
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
    return _save_folder(path_dir, generator, FORMAT_NAME, cfg.to_dict(), extra_meta)


def _save_folder(path_dir: str | Path, module: torch.nn.Module, format_name: str, config: dict,
                 extra_meta: dict[str, Any] | None) -> Path:
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    document = {"format": format_name, "format_version": FORMAT_VERSION, "model": config, "meta": extra_meta or {}}
    text = json.dumps(document, indent=2, sort_keys=True)  # fails here, before writing, if extra_meta is not JSON-safe
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": format_name})
    write_text_atomic(path_dir / CONFIG_FILE, text + "\n")
    return path_dir


def load_config(path_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read ``config.json`` of a checkpoint folder: ``(ModelConfig, extra_meta)``."""
    return _load_document(path_dir, FORMAT_NAME, ModelConfig, "save_model")


def _load_document(path_dir: str | Path, format_name: str, config_class, writer: str):
    path = Path(path_dir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(path, f"checkpoint config not found (expected a folder written by {writer})")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON: {e}") from e
    if not isinstance(document, dict) or document.get("format") != format_name:
        found = document.get("format") if isinstance(document, dict) else None
        raise InputError(path, f"not a {format_name} checkpoint (format={found!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise InputError(
            path, f"checkpoint format version {document.get('format_version')} is not supported (need {FORMAT_VERSION})"
        )
    try:
        cfg = config_class.from_dict(document["model"])
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

# --- super-resolution networks (models/sr.py): same folder layout, their own format name and config ------------

SR_FORMAT_NAME = "metaportrait-sr"


def save_sr_model(path_dir: str | Path, model: torch.nn.Module, cfg: SRConfig,
                  extra_meta: dict[str, Any] | None = None) -> Path:
    """Write a `metaportrait.models.sr.TemporalSR` and its `SRConfig` into the folder ``path_dir``."""
    return _save_folder(path_dir, model, SR_FORMAT_NAME, cfg.to_dict(), extra_meta)


def load_sr_model(path_dir: str | Path):
    """Rebuild the SR network saved by `save_sr_model`: ``(TemporalSR, SRConfig, extra_meta)``, in eval mode.

    Raises:
        InputError: the folder, its config or its weights are missing, unreadable or do not match.
    """
    from metaportrait.models.sr import TemporalSR  # io may not import models at module level (layering)

    path_dir = Path(path_dir)
    if not path_dir.is_dir():
        raise InputError(path_dir, "super-resolution checkpoint folder not found")
    cfg, meta = _load_document(path_dir, SR_FORMAT_NAME, SRConfig, "save_sr_model")
    weights = path_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(weights, "checkpoint weights not found")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise InputError(weights, f"cannot read the weights: {e}") from e
    model = TemporalSR(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(weights, f"weights do not match the config: {str(e).splitlines()[0]}") from e
    return model.eval(), cfg, meta
