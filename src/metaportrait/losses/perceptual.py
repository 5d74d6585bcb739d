"""FOMM's multi-scale perceptual pyramid loss (MetaPortrait uses it verbatim), on a frozen ImageNet backbone.

    loss = sum over scales s, layers l of  w_l * mean |phi_l(pyramid_s(prediction)) - phi_l(pyramid_s(target))|

with the target's features detached. The pyramid is FOMM's ``AntiAliasInterpolation2d``: Gaussian blur with
sigma = (1/s - 1)/2 (kernel 2*round(4 sigma)+1, zero padding, as FOMM) and then every (1/s)-th pixel.

FOMM and MetaPortrait use ImageNet VGG19 (`VGG19Features`, needs a user-given weight file). The ImageNet
backbone that is available offline here is MobileNetV2 (`MobileNetV2Features`), so that is the default in
this project; its numbers are not comparable with a VGG19 loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.models.backbones import FrozenBackbone, MobileNetV2Features, VGG19Features

__all__ = ["AntiAliasInterpolation2d", "MobileNetV2Features", "PerceptualPyramidLoss", "VGG19Features"]

# FOMM config/vox-256.yaml: loss_weights.perceptual = [10, 10, 10, 10, 10]
DEFAULT_LAYER_WEIGHTS = (10.0, 10.0, 10.0, 10.0, 10.0)
DEFAULT_SCALES = (1.0, 0.5, 0.25, 0.125)


class AntiAliasInterpolation2d(nn.Module):
    """Band-limited downsampling by ``scale`` (FOMM's ``AntiAliasInterpolation2d``), for (B, C, H, W)."""

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


class PerceptualPyramidLoss(nn.Module):
    """Multi-scale L1 feature loss for (B, 3, H, W) images in [0, 1] -> scalar.

    The backbone is a registered submodule (it follows ``.to(device)``) and stays frozen in eval mode; the
    loss's gradient flows only to ``prediction``.
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        scales: Sequence[float] = DEFAULT_SCALES,
        layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS,
    ):
        """Args:
            backbone: frozen feature extractor whose forward returns one map per entry of ``layer_weights``.
            scales: pyramid scales, each 1/n.
            layer_weights: weight of each feature map's L1 term.
        """
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.scales = tuple(float(s) for s in scales)
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.pyramid = nn.ModuleList(AntiAliasInterpolation2d(3, s) for s in self.scales)
        self.train(False)

    def train(self, mode: bool = True) -> PerceptualPyramidLoss:
        # Nothing here trains: keep the backbone's batch norm frozen whatever the caller does.
        return super().train(False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args:
            prediction: (B, 3, H, W) in [0, 1]; receives the gradient.
            target: (B, 3, H, W) in [0, 1]; treated as a constant.

        Returns:
            scalar loss.
        """
        assert prediction.shape == target.shape and prediction.ndim == 4 and prediction.shape[1] == 3, (
            prediction.shape,
            target.shape,
        )
        total = prediction.new_zeros(())
        for downsample in self.pyramid:
            predicted_features = self.backbone(downsample(prediction))
            with torch.no_grad():
                target_features = self.backbone(downsample(target))
            if len(predicted_features) != len(self.layer_weights):
                raise ValueError(
                    f"backbone returns {len(predicted_features)} feature maps, "
                    f"but {len(self.layer_weights)} layer weights were given"
                )
            for weight, predicted, wanted in zip(self.layer_weights, predicted_features, target_features):
                total = total + weight * (predicted - wanted).abs().mean()
        return total
