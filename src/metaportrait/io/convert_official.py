"""Load the official MetaPortrait base-model checkpoints (only what mirroring the names cannot handle).

Our `Generator` and `MultiScaleDiscriminator` use the official module names, so the weights copy over without
renaming. This module handles the rest, each rule explicit and tested:

1. The wrapper: ``ckpt_base.pth.tar`` is a dict ``{generator, discriminator, optimizer_generator,
   optimizer_discriminator, epoch}`` (the release may keep only ``generator``). Optimiser states are ignored.
2. ``module.`` prefixes (DataParallel / DDP) are stripped.
3. Two generator layouts:
   * 436 keys, spectral norm on (``<layer>.weight_orig``, ``.weight_u``, ``.weight_v``): loaded into the official
     preset as is;
   * 386 keys, spectral norm removed (meta-training ``--remove_sn`` folds ``weight_orig / sigma`` into ``weight``):
     loaded into the official preset built with ``spectral_norm=False``. The folded weight *is* the effective
     weight, so outputs are exactly those of the network that was saved. (Re-wrapping it in spectral norm would
     divide it again by its own, only approximately 1, largest singular value.)
   Any other layout is an error listing the unexpected and missing keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metaportrait.config import PRESETS, ModelConfig
from metaportrait.errors import InputError

WRAPPER_KEYS = ("generator", "discriminator", "optimizer_generator", "optimizer_discriminator", "epoch")


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a leading ``module.`` (DataParallel / DDP) from every key that has one."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def has_spectral_norm(state: dict[str, torch.Tensor]) -> bool:
    """True for the 436-key layout (``weight_orig`` + ``weight_u`` / ``weight_v``), False for the 386-key layout.

    EqualLR linears (``adain.style.linear.weight_orig``) also end in ``weight_orig`` but are not spectral norm, so the
    test is on ``weight_u``.
    """
    return any(k.endswith(".weight_u") for k in state)


def load_official_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Read an official checkpoint file into ``(generator_state, discriminator_state or None)``, prefixes stripped.

    Accepts the training wrapper dict or a bare generator state dict. Uses ``weights_only=True``.
    """
    raw = _read_dict(path)
    if "generator" in raw:
        unknown = sorted(set(raw) - set(WRAPPER_KEYS))
        if unknown:
            raise InputError(path, f"unexpected top-level keys {unknown} (expected some of {list(WRAPPER_KEYS)})")
        generator, discriminator = raw["generator"], raw.get("discriminator")
    else:
        generator, discriminator = raw, None
    generator = strip_module_prefix(generator)
    discriminator = strip_module_prefix(discriminator) if discriminator is not None else None
    return generator, discriminator


def _read_dict(path: str | Path) -> dict:
    """``torch.load`` of a file that must hold a dict (weights only); any problem is an `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / pickled-object files
        raise InputError(path, f"cannot read as a weights-only torch checkpoint: {e}") from e
    if not isinstance(raw, dict):
        raise InputError(path, f"expected a dict, got {type(raw).__name__}")
    return raw


def load_official_checkpoint(path: str | Path, cfg: ModelConfig | None = None):
    """Build ``(Generator, MultiScaleDiscriminator)`` from an official checkpoint, loaded with strict=True.

    Args:
        path: ``ckpt_base.pth.tar`` (436-key spectral-norm layout) or a meta-trained checkpoint (386-key layout),
            wrapped or bare.
        cfg: architecture to load into; default ``PRESETS["official"]``. Its ``spectral_norm`` flag is set from
            the file's layout.
    Returns:
        The generator (eval mode) and the discriminator (eval mode; randomly initialised when the file has none).
    """
    from metaportrait.models.discriminator import MultiScaleDiscriminator  # io may not import models at module level
    from metaportrait.models.generator import Generator

    generator_state, discriminator_state = load_official_state(path)
    cfg = (cfg or PRESETS["official"]).replace(spectral_norm=has_spectral_norm(generator_state))
    # Built on the meta device and filled by assignment: 130 M random initial values would be thrown away anyway.
    with torch.device("meta"):
        generator = Generator(cfg)
    _load_strict(generator, generator_state, path, "generator", assign=True)
    discriminator = MultiScaleDiscriminator(cfg.discriminator)
    if discriminator_state is not None:
        _load_strict(discriminator, discriminator_state, path, "discriminator")
    return generator.eval(), discriminator.eval()


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str, assign: bool = False):
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            path,
            f"{what} layout does not match the official one ({len(state)} keys, expected {len(expected)}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
        )
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise InputError(path, f"{what} shape mismatch (key, file, expected): {bad[:5]}")
    module.load_state_dict(state, strict=True, assign=assign)
    left_on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{what}: tensors not filled from the checkpoint: {left_on_meta[:5]}")


# --- temporal super-resolution (GFPGAN v1 clean + temporal window) -------------------------------------------

BASICSR_KEYS = ("params_ema", "params")  # BasicSR saves {"params": ...} or {"params", "params_ema"}; EMA preferred


def load_official_sr_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The SR state dict in a BasicSR-style file (``params_ema``, else ``params``) or a bare state dict, with
    ``module.`` prefixes stripped. Uses ``weights_only=True``."""
    raw = _read_dict(path)
    state = next((raw[k] for k in BASICSR_KEYS if k in raw), raw)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, f"expected a state dict (or a BasicSR file with {' / '.join(BASICSR_KEYS)})")
    return strip_module_prefix(state)


def load_official_sr(path: str | Path, cfg=None):
    """Build the official `TemporalSR` (``SR_PRESETS["official"]`` unless ``cfg``) from an official file, strict.

    GFPGAN v1.3 / v1.4 files (no temporal layers) load into ``cfg.replace(temporal=False)``, the per-frame network.
    """
    from metaportrait.config import SR_PRESETS
    from metaportrait.models.sr import TemporalSR  # io may not import models at module level

    state = load_official_sr_state(path)
    cfg = cfg or SR_PRESETS["official"]
    if not any(k.startswith("window_down.") for k in state):
        cfg = cfg.replace(temporal=False)
    with torch.device("meta"):
        model = TemporalSR(cfg)
    _load_strict(model, state, path, "super-resolution network", assign=True)
    return model.eval()
