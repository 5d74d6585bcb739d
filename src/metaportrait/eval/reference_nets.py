"""The published LPIPS and FID networks, loaded from weight files the user gives (nothing is downloaded).

- `LPIPSAlex`: LPIPS v0.1 with the AlexNet trunk (Zhang et al., CVPR 2018; the ``lpips`` package's default,
  ``lpips.LPIPS(net="alex")``). It needs two files: torchvision's ImageNet AlexNet
  (``alexnet-owt-7be5be79.pth``, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth) for the trunk,
  and the ``lpips`` package's ``lpips/weights/v0.1/alex.pth`` (in its wheel or its GitHub repository,
  richzhang/PerceptualSimilarity) for the five linear heads.
- `FIDInceptionV3`: the TensorFlow FID Inception-v3 as ported by pytorch-fid (``pytorch_fid.inception
  .InceptionV3`` with its defaults: FID blocks, resize to 299, inputs scaled to [-1, 1]), pool3 features.
  It needs ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's GitHub release ``fid_weights``).

Both are re-defined here without torchvision, with the module names of the weight files, so the files load
strictly: every key is checked by name and shape, and any mismatch raises `InputError` naming the file. The
metric values are then those of the ``lpips`` package and of pytorch-fid (FID itself also depends on the number
of images: compare only values computed on the same number of frames).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.errors import InputError
from metaportrait.io.checkpoint import load_weight_file  # noqa: F401  (here since the LPIPS/FID loaders use it)
from metaportrait.eval.features import _LinearHead, _ScalingLayer, lpips_from_features

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LINEAR_FILE = "lpips/weights/v0.1/alex.pth"
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"

# ---------------------------------------------------------------------------------------------------------
# Strict loading of foreign weight files
# ---------------------------------------------------------------------------------------------------------


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def checked_state_dict(
    path: str | Path,
    module: nn.Module,
    expected: str,
    ignored: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """The file's tensors for ``module``, after checking every key and shape against ``module.state_dict()``.

    Args:
        path: the weight file.
        module: the module the file must fit exactly.
        expected: which file this should be, for error messages.
        ignored: keys the file may hold that the module does not use (e.g. a classifier); dropped by name.

    BatchNorm's ``num_batches_tracked`` counters (unused at inference) may be absent: files written by PyTorch
    before 0.4.1 have none, and ``load_state_dict`` itself fills them in for such files.

    Raises:
        InputError: missing keys, unexpected keys or wrong shapes, with the first few names.
    """
    state = load_weight_file(path, expected)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k not in ignored}
    counters = {k for k in own if k.endswith(".num_batches_tracked")}
    missing = set(own) - set(state) - counters
    unexpected = set(state) - set(own)
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of the wrong shape ({_names(wrong_shape, 2)})")
    if problems:
        raise InputError(path, f"does not fit (expected {expected}): " + "; ".join(problems))
    for key in counters - set(state):
        state[key] = own[key]
    return state


# ---------------------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1)
# ---------------------------------------------------------------------------------------------------------

LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# torchvision's alexnet().features has 13 layers; LPIPS reads the outputs of its five ReLUs (relu1 ... relu5,
# the ends of the lpips package's slice1 ... slice5). The last max pool (index 12) is never reached.
_ALEXNET_RELU_INDICES = (1, 4, 7, 9, 11)
_ALEXNET_CLASSIFIER_KEYS = frozenset(f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias"))


def _alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features[:12]``: indices are those of the ImageNet file's ``features.*`` keys."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
        nn.ReLU(),  # 1  relu1
        nn.MaxPool2d(kernel_size=3, stride=2),  # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
        nn.ReLU(),  # 4  relu2
        nn.MaxPool2d(kernel_size=3, stride=2),  # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
        nn.ReLU(),  # 7  relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
        nn.ReLU(),  # 9  relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
        nn.ReLU(),  # 11 relu5
    )


class _AlexNetTrunk(nn.Module):
    """Holds ``features`` (the key prefix of torchvision's file) and returns the five ReLU outputs."""

    def __init__(self):
        super().__init__()
        self.features = _alexnet_features()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _ALEXNET_RELU_INDICES:
                outputs.append(x)
        return outputs


class _LinearHeads(nn.Module):
    """``lin0`` ... ``lin4``: the key names of the lpips package's ``weights/v0.1/alex.pth``."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        for index, channel_count in enumerate(channels):
            self.add_module(f"lin{index}", _LinearHead(channel_count))


class LPIPSAlex(nn.Module):
    """LPIPS v0.1, AlexNet trunk, frozen: ``LPIPSAlex(alexnet, linear)(a, b) -> (B,)`` for images in [0, 1].

    Equal to ``lpips.LPIPS(net="alex", version="0.1")(a, b, normalize=True)``: inputs mapped to [-1, 1] and
    shifted / scaled per channel, AlexNet ReLU features unit-normalised over channels, squared differences
    weighted per channel by the learned 1x1 heads, averaged over space, summed over the five layers.
    Lower is more similar; identical images give exactly 0.
    """

    def __init__(self, alexnet_path: str | Path, linear_path: str | Path):
        """Args:
            alexnet_path: torchvision's ImageNet ``alexnet-owt-7be5be79.pth`` (its ``classifier.*`` is unused).
            linear_path: the lpips package's ``weights/v0.1/alex.pth`` (``lin0.model.1.weight`` ... ``lin4``).

        Raises:
            InputError: a file is missing or does not fit.
        """
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _AlexNetTrunk()
        self.heads = _LinearHeads(LPIPS_CHANNELS)
        self.net.load_state_dict(
            checked_state_dict(alexnet_path, self.net, ALEXNET_FILE, ignored=_ALEXNET_CLASSIFIER_KEYS), strict=True
        )
        self.heads.load_state_dict(checked_state_dict(linear_path, self.heads, LPIPS_LINEAR_FILE), strict=True)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> LPIPSAlex:
        # A metric: the heads' dropout must stay off.
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance between image batches a and b, each (B, 3, H, W) RGB in [0, 1] (H, W >= 32). Returns (B,)."""
        assert a.shape == b.shape and a.ndim == 4 and a.shape[1] == 3, (a.shape, b.shape)
        features_a = self.net(self.scaling_layer(2.0 * a - 1.0))
        features_b = self.net(self.scaling_layer(2.0 * b - 1.0))
        return lpips_from_features(features_a, features_b, list(self.heads.children()))


# ---------------------------------------------------------------------------------------------------------
# FID Inception-v3 (pytorch-fid)
# ---------------------------------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; names ``conv`` / ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool ignores the zero padding at the border (pytorch-fid's FID blocks do too).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 5x5 | double 3x3 | avg pool + 1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): stride-2 3x3 | double 3x3 | max pool -> 480 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            dim=1,
        )


class _InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 3x3 | 7x7 then 3x3 | max pool -> 512 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class _InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 convolutions -> 2048 channels.

    ``pool`` is "avg" for Mixed_7b (pytorch-fid's FIDInceptionE_1, TensorFlow's border-excluding average) and
    "max" for Mixed_7c (FIDInceptionE_2: the TensorFlow graph uses a max pool there, unlike the paper).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


FID_FEATURE_DIM = 2048
FID_INPUT_SIZE = 299
FID_CLASSES = 1008  # the TensorFlow graph's classifier (1000 ImageNet classes + 8 unused); not used for FID
_FID_CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3, frozen: (B, 3, H, W) RGB in [0, 1] -> (B, 2048) pool3 features.

    As ``pytorch_fid.inception.InceptionV3()`` (block 3, ``resize_input=True``, ``normalize_input=True``):
    bilinear resize to 299x299 (``align_corners=False``, no anti-aliasing), scale to [-1, 1], the Inception-v3
    stem and blocks, global average pool. Attribute names are those of the weight file (torchvision's
    ``Inception3`` without the auxiliary classifier); ``fc`` is in the file but not used, so it is not built.
    """

    def __init__(self, weights_path: str | Path):
        """Args:
            weights_path: ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid.

        Raises:
            InputError: the file is missing or does not fit.
        """
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool="avg")
        self.Mixed_7c = _InceptionE(2048, pool="max")
        self.load_state_dict(
            checked_state_dict(weights_path, self, FID_INCEPTION_FILE, ignored=_FID_CLASSIFIER_KEYS), strict=True
        )
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        # A feature extractor: BatchNorm must keep its running statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        size = (FID_INPUT_SIZE, FID_INPUT_SIZE)
        x = 2.0 * F.interpolate(images, size=size, mode="bilinear", align_corners=False) - 1.0  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): the adaptive average pool of pytorch-fid's block 3


@torch.no_grad()
def inception_features(images: torch.Tensor, extractor: FIDInceptionV3, batch_size: int = 8) -> np.ndarray:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 2048) float64 FID features, computed ``batch_size`` images at a time."""
    device = next(extractor.parameters()).device
    chunks = [
        extractor(images[start : start + batch_size].to(device)).double().cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks).numpy()
