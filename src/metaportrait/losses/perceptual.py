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
from torch import nn

from metaportrait.models.backbones import FrozenBackbone, MobileNetV2Features, VGG19Features
from metaportrait.models.blocks import AntiAliasInterpolation2d

__all__ = ["AntiAliasInterpolation2d", "MobileNetV2Features", "PerceptualPyramidLoss", "VGG19Features"]

# FOMM config/vox-256.yaml: loss_weights.perceptual = [10, 10, 10, 10, 10]
DEFAULT_LAYER_WEIGHTS = (10.0, 10.0, 10.0, 10.0, 10.0)
DEFAULT_SCALES = (1.0, 0.5, 0.25, 0.125)




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
