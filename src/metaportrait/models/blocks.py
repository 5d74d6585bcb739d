"""Layers shared by the warping, refinement and discriminator networks (the one shared-blocks file).

Names of attributes follow the official MetaPortrait code where a checkpoint stores them
(`mlp_shared`, `mlp_gamma`, `SameBlock2d`, `style.linear.weight_orig`, ...), so official state dicts load
without renaming.

Conventions (docs/contracts.md): grids are ``(B, H, W, 2)`` with ``(x, y)`` in ``[-1, 1]`` and are sampled with
``align_corners=False``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["instance", "none"]


# ----------------------------------------------------------------------------------------------------------------
# Grids and warping


def make_coordinate_grid(
    height: int,
    width: int,
    convention: Literal["corners", "centers"],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Identity sampling grid ``(height, width, 2)``, ``(x, y)`` in ``[-1, 1]``.

    ``"centers"`` is the true identity for ``grid_sample(align_corners=False)``: pixel i maps to (2i + 1)/W - 1.
    ``"corners"`` is FOMM's / MetaPortrait's grid, pixel i maps to 2i/(W - 1) - 1. Sampled with
    align_corners=False it is a slight zoom-out (half a pixel at each edge); the official flow was trained on
    top of it, so the official preset keeps it.
    """
    if convention == "corners":
        xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
        ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    elif convention == "centers":
        xs = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
        ys = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    else:
        raise ValueError(f"unknown grid convention {convention!r}, expected 'corners' or 'centers'")
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a ``(B, h, w, 2)`` grid to ``(B, *size, 2)``.

    Grid values are normalised coordinates, so they need no rescaling. Same call as the official `deform_input`.
    """
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1)


def deform_input(inp: torch.Tensor, deformation: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Warp ``inp`` ``(B, C, H, W)`` by a sampling grid ``(B, h, w, 2)``, resized to ``(H, W)`` if needed.

    Official conventions: bilinear grid resize, then ``grid_sample(mode="bilinear", align_corners=False)``.
    Returns ``(B, C, H, W)``; for inputs in [0, 1] the output stays in [0, 1] (convex combinations).
    """
    assert inp.dim() == 4 and deformation.dim() == 4 and deformation.shape[-1] == 2, (inp.shape, deformation.shape)
    deformation = resize_grid(deformation, inp.shape[2:])
    return F.grid_sample(inp, deformation, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def resize_map(x: torch.Tensor, size: tuple[int, int] | torch.Size, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a ``(B, C, H, W)`` map; ``antialias`` low-pass filters when shrinking (thin lines)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if x.shape[0] > 1 and x.stride(0) == 0:  # one map expanded over the batch (a source's): resize it once
        return resize_map(x[:1], size, antialias).expand(x.shape[0], -1, -1, -1)
    shrinking = size[0] < x.shape[2] or size[1] < x.shape[3]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias and shrinking)


class AntiAliasInterpolation2d(nn.Module):
    """Band-limited downsampling by ``scale`` = 1/n (FOMM's ``AntiAliasInterpolation2d``): Gaussian blur with
    sigma = (1/scale - 1)/2, then every n-th pixel (FOMM's nearest resize). Input ``(B, C, H, W)``; ``scale == 1``
    is the identity. Used by the perceptual pyramid and the multi-scale discriminator.
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        inverse = round(1.0 / scale)
        if not 0 < scale <= 1 or abs(inverse * scale - 1.0) > 1e-6:
            raise ValueError(f"scale must be 1/n for a whole n, got {scale}")
        self.step = inverse
        self.channels = channels
        sigma = (1.0 / scale - 1.0) / 2.0
        kernel_size = 2 * round(sigma * 4) + 1
        self.before = kernel_size // 2  # odd kernel, so the same padding on both sides
        positions = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2.0
        gaussian = torch.exp(-(positions**2) / (2.0 * sigma**2)) if sigma > 0 else (positions == 0).float()
        kernel = gaussian[:, None] * gaussian[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, kernel_size, kernel_size).clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, ceil(H*scale), ceil(W*scale))."""
        if self.step == 1:
            return images
        assert images.ndim == 4 and images.shape[1] == self.channels, images.shape
        x = F.pad(images, (self.before,) * 4)  # zero padding, as FOMM (it darkens the border slightly)
        x = F.conv2d(x, self.weight, groups=self.channels)
        return x[:, :, :: self.step, :: self.step]


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and modulation


def normalize(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Parameter-free normalisation of ``(B, C, H, W)``: per-sample, per-channel ("instance") or none.

    "none" exists because instance statistics are a large share of CPU time in small models; without it the
    modulations below become plain FiLM/SPADE-style affine maps of the raw activations.
    """
    if norm == "instance":
        return F.instance_norm(x, eps=1e-5)
    if norm == "none":
        return x
    raise ValueError(f"unknown norm {norm!r}, expected 'instance' or 'none'")


class LayerNorm2d(nn.Module):
    """``F.layer_norm`` over (C, H, W) with a per-channel affine of shape (C, 1, 1) (official flow heads)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[1:]
        return F.layer_norm(x, shape, self.weight.expand(shape), self.bias.expand(shape))


class _EqualLinearWeights(nn.Module):
    # Holds `weight_orig` / `bias` under the names StyleGAN-1's equal_lr hook gave them (official checkpoint keys).
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weight ~ N(0, 1) stored, scaled by sqrt(2 / in_dim) at run time."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = _EqualLinearWeights(in_dim, out_dim)
        self.scale = math.sqrt(2 / in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight_orig * self.scale, self.linear.bias)


class ADAIN(nn.Module):
    """Motion-code FiLM (official name `ADAIN`): ``normalize(x) * (1 + gamma(z)) + beta(z)``.

    ``x`` ``(B, C, H, W)``, code ``(B, code_dim)``; gamma, beta come from an MLP code -> hidden (ReLU) -> C.
    """

    def __init__(self, channels: int, code_dim: int, hidden: int, norm: Norm):
        super().__init__()
        self.norm = norm
        self.mlp_shared = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden, channels)
        self.mlp_beta = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(code)
        gamma = self.mlp_gamma(actv)[:, :, None, None]  # (B, C, 1, 1)
        beta = self.mlp_beta(actv)[:, :, None, None]
        return normalize(x, self.norm) * (1 + gamma) + beta


class AdaptiveInstanceNorm(nn.Module):
    """Identity AdaIN (StyleGAN-1 style): ``gamma(z_id) * normalize(x) + beta(z_id)``, note gamma, not 1 + gamma.

    ``[gamma, beta] = EqualLinear(identity_dim -> 2C)(z_id)``; the bias starts at gamma = 1, beta = 0.
    """

    def __init__(self, channels: int, identity_dim: int, norm: Norm):
        super().__init__()
        self.norm = norm
        self.style = EqualLinear(identity_dim, 2 * channels)
        with torch.no_grad():
            self.style.linear.bias[:channels] = 1.0

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(identity)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return gamma * normalize(x, self.norm) + beta


class SPADE(nn.Module):
    """The refinement norm: SPADE motion branch fused with an identity AdaIN branch by a learned attention mask.

    ``x̂ = normalize(x)``; ``h_m = x̂ * (1 + gamma(cond)) + beta(cond)`` with gamma, beta from convs on the
    conditioning map; ``h_id = AdaIN(x, z_id)``; ``M = sigmoid(conv(x))`` on the un-normalised x (as official);
    ``out = M * h_m + (1 - M) * h_id``. With ``identity_dim=None`` (ablation) the identity branch and the mask do
    not exist and ``out = h_m``.

    Args of forward: ``x`` ``(B, C, H, W)``; ``cond`` ``(B, label_nc, H, W)``; ``identity`` ``(B, identity_dim)``.
    """

    def __init__(
        self,
        channels: int,
        label_nc: int,
        identity_dim: int | None,
        hidden: int,
        kernel: int,
        norm: Norm,
        param_kernel: int | None = None,
    ):
        super().__init__()
        self.norm = norm
        param_kernel = kernel if param_kernel is None else param_kernel
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel, padding=kernel // 2), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, param_kernel, padding=param_kernel // 2)
        self.mlp_beta = nn.Conv2d(hidden, channels, param_kernel, padding=param_kernel // 2)
        self.has_identity = identity_dim is not None
        if identity_dim is not None:
            self.mlp_attention = nn.Sequential(nn.Conv2d(channels, 1, kernel, padding=kernel // 2), nn.Sigmoid())
            self.adain = AdaptiveInstanceNorm(channels, identity_dim, norm)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
        actv = self.mlp_shared(cond)
        motion = normalize(x, self.norm) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)
        if not self.has_identity:
            return motion
        attention = self.mlp_attention(x)  # (B, 1, H, W)
        return attention * motion + (1 - attention) * self.adain(x, identity)


def spectral_norm_if(module: nn.Module, enabled: bool) -> nn.Module:
    """Wrap with `torch.nn.utils.spectral_norm` (hook style: ``weight_orig``, ``weight_u``, ``weight_v`` keys).

    The hook style, not the parametrisation API, because the official checkpoints store these key names.
    For ConvTranspose2d torch normalises along dim 1, as the official checkpoint expects (u has out_channels).
    """
    return nn.utils.spectral_norm(module) if enabled else module


def remove_all_spectral_norms(module: nn.Module) -> nn.Module:
    """Fold every spectral-norm hook into a plain ``weight`` (official ``--remove_sn``), in place; returns module.

    Uses the stored u, v without a power-iteration step, i.e. exactly the eval-mode weight.
    """
    from torch.nn.utils.spectral_norm import SpectralNorm

    for sub in module.modules():
        if any(isinstance(hook, SpectralNorm) for hook in sub._forward_pre_hooks.values()):
            nn.utils.remove_spectral_norm(sub)
    return module


class SPADEResnetBlock(nn.Module):
    """Residual block of two 3x3 convs, each preceded by a fused `SPADE` norm and LeakyReLU(0.2).

    ``out = shortcut(x) + conv_1(act(norm_1(conv_0(act(norm_0(x))))))``; when ``fin != fout`` the shortcut is
    ``conv_s(norm_s(x))`` (1x1, no bias). ``x`` ``(B, fin, H, W)`` -> ``(B, fout, H, W)``.
    """

    def __init__(
        self,
        fin: int,
        fout: int,
        label_nc: int,
        identity_dim: int | None,
        hidden: int,
        kernel: int,
        norm: Norm,
        spectral_norm: bool,
        param_kernel: int | None = None,
    ):
        super().__init__()
        self.fin, self.fout = fin, fout
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral_norm_if(nn.Conv2d(fin, fmiddle, 3, padding=1), spectral_norm)
        self.conv_1 = spectral_norm_if(nn.Conv2d(fmiddle, fout, 3, padding=1), spectral_norm)
        spade = dict(identity_dim=identity_dim, hidden=hidden, kernel=kernel, norm=norm, param_kernel=param_kernel)
        self.norm_0 = SPADE(fin, label_nc, **spade)
        self.norm_1 = SPADE(fmiddle, label_nc, **spade)
        if self.learned_shortcut:
            self.conv_s = spectral_norm_if(nn.Conv2d(fin, fout, 1, bias=False), spectral_norm)
            self.norm_s = SPADE(fin, label_nc, **spade)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, identity: torch.Tensor | None) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, cond, identity)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, cond, identity), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, cond, identity), 0.2))
        return shortcut + dx


# ----------------------------------------------------------------------------------------------------------------
# Hourglass (FOMM / MetaPortrait `modules/util.py`), optionally modulated by a motion code


class _ConvNorm(nn.Module):
    # conv -> norm -> ReLU. The norm is the motion FiLM (`ADAIN`) when a code is given, an affine InstanceNorm for
    # norm="instance" (official feature encoder), or nothing.
    def __init__(self, fin, fout, stride, norm: Norm, code_dim: int, film_hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(fin, fout, 3, stride=stride, padding=1)
        self.uses_code = code_dim > 0
        if self.uses_code:
            self.norm = ADAIN(fout, code_dim, film_hidden, norm)
        elif norm == "instance":
            self.norm = nn.InstanceNorm2d(fout, affine=True)
        else:
            self.norm = nn.Identity()

    def _norm_act(self, out, code):
        out = self.norm(out, code) if self.uses_code else self.norm(out)
        return F.relu(out)


class SameBlock2d(_ConvNorm):
    """conv3x3 -> norm -> ReLU at constant resolution."""

    def __init__(self, fin, fout, norm: Norm, code_dim: int = 0, film_hidden: int = 128):
        super().__init__(fin, fout, 1, norm, code_dim, film_hidden)

    def forward(self, x, code=None):
        return self._norm_act(self.conv(x), code)


class DownBlock2d(_ConvNorm):
    """Halve the resolution: conv3x3 -> norm -> ReLU -> AvgPool2 ("pool", official) or a stride-2 conv ("stride").

    The two modes have identical parameters; "stride" costs a quarter of the conv FLOPs.
    """

    def __init__(self, fin, fout, norm: Norm, down_mode: str, code_dim: int = 0, film_hidden: int = 128,
                 same_block: bool = False):
        if down_mode not in ("pool", "stride"):
            raise ValueError(f"unknown down_mode {down_mode!r}, expected 'pool' or 'stride'")
        super().__init__(fin, fout, 2 if down_mode == "stride" else 1, norm, code_dim, film_hidden)
        self.pool = down_mode == "pool"
        if same_block:
            self.SameBlock2d = SameBlock2d(fout, fout, norm, code_dim, film_hidden)  # official `Lwarp` name
        self.same_block = same_block

    def forward(self, x, code=None):
        out = self._norm_act(self.conv(x), code)
        if self.pool:
            out = F.avg_pool2d(out, 2)
        if self.same_block:
            out = self.SameBlock2d(out, code)
        return out


class UpBlock2d(_ConvNorm):
    """Double the resolution: nearest x2 -> conv3x3 -> norm -> ReLU (official order)."""

    def __init__(self, fin, fout, norm: Norm, code_dim: int = 0, film_hidden: int = 128, same_block: bool = False):
        super().__init__(fin, fout, 1, norm, code_dim, film_hidden)
        if same_block:
            self.SameBlock2d = SameBlock2d(fout, fout, norm, code_dim, film_hidden)
        self.same_block = same_block

    def forward(self, x, code=None):
        out = self._norm_act(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), code)
        if self.same_block:
            out = self.SameBlock2d(out, code)
        return out


class Encoder(nn.Module):
    """Hourglass encoder; returns ``[x, level_1, ..., level_num_blocks]`` (each half the previous resolution)."""

    def __init__(self, block_expansion, in_features, num_blocks, max_features, norm, down_mode, code_dim,
                 film_hidden, same_blocks):
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock2d(
                in_features if i == 0 else min(max_features, block_expansion * 2**i),
                min(max_features, block_expansion * 2 ** (i + 1)),
                norm, down_mode, code_dim, film_hidden, same_blocks,
            )
            for i in range(num_blocks)
        )

    def forward(self, x, code=None):
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1], code))
        return outs


class Decoder(nn.Module):
    """Hourglass decoder with skip concatenation; stops ``dec_lease`` levels before the input resolution."""

    def __init__(self, block_expansion, in_features, num_blocks, dec_lease, max_features, norm, code_dim,
                 film_hidden, same_blocks):
        super().__init__()
        blocks = []
        for i in reversed(range(dec_lease, num_blocks)):
            fin = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * 2 ** (i + 1))
            fout = min(max_features, block_expansion * 2**i)
            blocks.append(UpBlock2d(fin, fout, norm, code_dim, film_hidden, same_blocks))
        self.up_blocks = nn.ModuleList(blocks)
        # Channels of the final output: last up block + its skip (the input itself when dec_lease == 0).
        self.out_filters = fout + in_features if dec_lease == 0 else 2 * fout

    def forward(self, skips: list[torch.Tensor], code=None, return_all: bool = False):
        skips = list(skips)
        out = skips.pop()
        levels = [out]
        for block in self.up_blocks:
            out = block(out, code)
            levels.append(out)
            out = torch.cat([out, skips.pop()], dim=1)
        # As official `return_all`: the finest level is the concatenation with its skip, not the block output.
        levels[-1] = out
        return (out, levels) if return_all else out


class Hourglass(nn.Module):
    """U-Net of `DownBlock2d` / `UpBlock2d` (official names `encoder.down_blocks`, `decoder.up_blocks`).

    ``forward(x (B, in_features, H, W), code (B, code_dim) | None)`` -> ``(B, out_filters, H / 2**dec_lease, ...)``;
    with ``return_all`` also the list of decoder levels, coarsest first.
    """

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int, norm: Norm,
                 down_mode: str = "pool", dec_lease: int = 0, code_dim: int = 0, film_hidden: int = 128,
                 same_blocks: bool = False):
        super().__init__()
        args = dict(norm=norm, code_dim=code_dim, film_hidden=film_hidden, same_blocks=same_blocks)
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features, down_mode=down_mode, **args)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, dec_lease, max_features, **args)
        self.out_filters = self.decoder.out_filters
        self.level_channels = [min(max_features, block_expansion * 2**num_blocks)] + [
            block.conv.out_channels for block in self.decoder.up_blocks
        ]
        self.level_channels[-1] = self.out_filters

    def forward(self, x: torch.Tensor, code: torch.Tensor | None = None, return_all: bool = False):
        return self.decoder(self.encoder(x, code), code, return_all=return_all)
