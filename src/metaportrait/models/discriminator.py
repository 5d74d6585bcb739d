"""Multi-scale patch discriminator (official `MultiScaleDiscriminator`, from FOMM / pix2pix).

One `Discriminator` per image scale, stored under ``discs.<scale>`` with the dot written as "-" (``discs.1``,
``discs.0-5``), as FOMM names them. The official model uses scale 1 only, InstanceNorm and no spectral norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.config import DiscriminatorConfig
from metaportrait.models.blocks import AntiAliasInterpolation2d, Norm


def scale_key(scale: float) -> str:
    """Module key of a scale: 1.0 -> "1", 0.5 -> "0-5" (ModuleDict keys cannot contain dots)."""
    return f"{scale:g}".replace(".", "-")


class DownBlock2d(nn.Module):
    """conv4x4 (no padding) -> [InstanceNorm(affine)] -> LeakyReLU(0.2) -> [AvgPool2]."""

    def __init__(self, fin: int, fout: int, norm: bool, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(fin, fout, kernel_size=4)
        if norm:
            self.norm = nn.InstanceNorm2d(fout, affine=True)
        self.use_norm, self.pool = norm, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.use_norm:
            out = self.norm(out)
        out = F.leaky_relu(out, 0.2)
        return F.avg_pool2d(out, 2) if self.pool else out


class Discriminator(nn.Module):
    """Patch discriminator: ``num_blocks`` down blocks then a 1x1 conv to one logit per patch.

    ``forward(x (B, in_channels, H, W))`` -> (features of each block, prediction ``(B, 1, h, w)``).
    """

    def __init__(self, block_expansion: int, max_features: int, num_blocks: int, norm: Norm, in_channels: int = 3):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            fin = in_channels if i == 0 else min(max_features, block_expansion * 2**i)
            fout = min(max_features, block_expansion * 2 ** (i + 1))
            blocks.append(DownBlock2d(fin, fout, norm=(i != 0 and norm == "instance"), pool=i != num_blocks - 1))
        self.down_blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(fout, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = []
        for block in self.down_blocks:
            x = block(x)
            features.append(x)
        return features, self.conv(x)


class MultiScaleDiscriminator(nn.Module):
    """One patch discriminator per scale of an anti-aliased image pyramid.

    ``forward(image (B, 3, H, W) in [0, 1])`` -> one ``(features, prediction)`` pair per scale, in
    ``cfg.scales`` order; used for LSGAN and feature matching.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.scales = cfg.scales
        self.discs = nn.ModuleDict(
            {
                scale_key(s): Discriminator(cfg.block_expansion, cfg.max_features, cfg.num_blocks, cfg.norm)
                for s in cfg.scales
            }
        )
        # Pyramid filters are fixed (non-persistent buffers), so they are not in the official key listing.
        self.downsample = nn.ModuleDict({scale_key(s): AntiAliasInterpolation2d(3, s) for s in cfg.scales})

    def forward(self, image: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        assert image.dim() == 4 and image.shape[1] == 3, image.shape
        return [self.discs[scale_key(s)](self.downsample[scale_key(s)](image)) for s in self.scales]


class MouthDiscriminator(nn.Module):
    """Patch discriminator on mouth crops, conditioned on the driving landmark lines of the same crop.

    The whole-frame losses let the refinement network paint the average mouth (a smooth light cavity); this
    local critic sees whether the teeth and the dark interior match the lip contour it is shown. Training only:
    it is not part of the generator checkpoint.

    ``forward(mouth (B, 3, s, s) in [0, 1], lines (B, 3, s, s) in [0, 1])`` -> ``(features of each block,
    prediction (B, 1, h, w))``. ``s`` >= 32.
    """

    def __init__(self, block_expansion: int = 32, max_features: int = 128, num_blocks: int = 3):
        super().__init__()
        self.disc = Discriminator(block_expansion, max_features, num_blocks, "none", in_channels=6)

    def forward(self, mouth: torch.Tensor, lines: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        assert mouth.shape == lines.shape and mouth.shape[1] == 3 and mouth.shape[-1] >= 32, (mouth.shape, lines.shape)
        return self.disc(torch.cat([mouth, lines], dim=1))
