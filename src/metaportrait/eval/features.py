"""Feature-based metrics that run offline: ST-LPIPS and a Fréchet distance on MobileNetV2 features.

- `STLPIPS`: shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022) with the weights shipped in ``stlpips-pytorch``
  (``weights/vST0.0/{alex,vgg}_shift_tolerant.pth``). The trunk (AlexNet or VGG16 with BlurPool, trained from
  scratch on BAPPS) and the linear heads are re-defined here without torchvision; module names mirror the
  package's, so its files load strictly. It is a different metric from LPIPS (whose ImageNet trunks are not
  available offline): report it as ST-LPIPS.
- `fd_mobilenetv2`: Fréchet distance between Gaussian fits of 1280-d ImageNet MobileNetV2 pooled features.
  Same formula as FID but a different network: report it as "FD-MobileNetV2", never as FID.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.models.backbones import MobileNetV2Features

# ---------------------------------------------------------------------------------------------------------
# ST-LPIPS
# ---------------------------------------------------------------------------------------------------------

STLPIPS_NETS = ("alex", "vgg")


def stlpips_weights_path(net: str) -> Path:
    """Path of ``{net}_shift_tolerant.pth`` inside the installed ``stlpips_pytorch`` package.

    Raises:
        ValueError: unknown net.
        ModuleNotFoundError: the package is not installed.
    """
    if net not in STLPIPS_NETS:
        raise ValueError(f"net must be one of {STLPIPS_NETS}, got {net!r}")
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "ST-LPIPS weights are not installed: `pip install --no-deps stlpips-pytorch` (its code is not used; "
            "only its weight files are)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; reinstall stlpips-pytorch")
    return path


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling (Zhang 2019) as in stlpips' ``Downsample(pad_more=True)``.

    Reflection padding of 2 on every side, then a fixed [1, 2, 1] x [1, 2, 1] / 16 depthwise filter with stride 2.
    The filter is a (persistent) buffer named ``filt`` because the weight files contain it.
    """

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


def _numbered(first_index: int, *layers: nn.Module) -> nn.Sequential:
    """An nn.Sequential whose children are named by their index in the original network (for strict loading)."""
    sequential = nn.Sequential()
    for offset, layer in enumerate(layers):
        sequential.add_module(str(first_index + offset), layer)
    return sequential


def _relu() -> nn.ReLU:
    return nn.ReLU(inplace=False)


def _alexnet_shift_tolerant() -> list[nn.Sequential]:
    """stlpips' ``alexnet(variant='shift_tolerant', filter_size=3)``: 5 slices ending at relu1 ... relu5."""
    return [
        _numbered(0, nn.Conv2d(3, 64, 11, stride=1, padding=2), BlurPool(64), _relu()),
        _numbered(3, nn.MaxPool2d(3, stride=1), BlurPool(64), nn.Conv2d(64, 192, 5, padding=2), _relu()),
        _numbered(7, nn.MaxPool2d(3, stride=1), BlurPool(192), nn.Conv2d(192, 384, 3, padding=1), _relu()),
        _numbered(11, nn.Conv2d(384, 256, 3, padding=1), _relu()),
        _numbered(13, nn.Conv2d(256, 256, 3, padding=1), _relu()),
    ]


def _vgg16_shift_tolerant() -> list[nn.Sequential]:
    """stlpips' ``vggnet(variant='shift_tolerant')``: VGG16 with 2x2/stride-1 max pool + BlurPool per 'M'.

    Slices end at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    """

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, padding=1)

    def pool(channels: int) -> tuple[nn.Module, nn.Module]:
        return nn.MaxPool2d(2, stride=1), BlurPool(channels)

    return [
        _numbered(0, conv(3, 64), _relu(), conv(64, 64), _relu()),
        _numbered(4, *pool(64), conv(64, 128), _relu(), conv(128, 128), _relu()),
        _numbered(10, *pool(128), conv(128, 256), _relu(), conv(256, 256), _relu(), conv(256, 256), _relu()),
        _numbered(18, *pool(256), conv(256, 512), _relu(), conv(512, 512), _relu(), conv(512, 512), _relu()),
        _numbered(26, *pool(512), conv(512, 512), _relu(), conv(512, 512), _relu(), conv(512, 512), _relu()),
    ]


class _Trunk(nn.Module):
    """Holds ``slice1`` ... ``slice5`` (names as in the weight files) and returns every slice's output."""

    def __init__(self, slices: list[nn.Sequential]):
        super().__init__()
        for number, module in enumerate(slices, start=1):
            self.add_module(f"slice{number}", module)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for module in self.children():
            x = module(x)
            outputs.append(x)
        return outputs


class _LinearHead(nn.Module):
    """LPIPS' 1x1 conv head; stored as ``model.1`` after a dropout in the weight files (inactive at eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _ScalingLayer(nn.Module):
    """LPIPS v0.1 input scaling of [-1, 1] images; ``shift`` and ``scale`` come from the weight file."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class STLPIPS(nn.Module):
    """Shift-tolerant LPIPS distance, frozen: ``STLPIPS("alex")(a, b) -> (B,)`` for (B, 3, H, W) in [0, 1].

    Lower is more similar; identical images give 0. AlexNet is the usual forward metric (and 3-4x faster).
    """

    def __init__(self, net: str = "alex", weights_path: str | Path | None = None):
        """Args:
            net: "alex" or "vgg".
            weights_path: a ``*_shift_tolerant.pth`` file; default: the one shipped by stlpips-pytorch.
        """
        super().__init__()
        path = Path(weights_path) if weights_path is not None else stlpips_weights_path(net)
        if net == "alex":
            slices, channels = _alexnet_shift_tolerant(), (64, 192, 384, 256, 256)
        elif net == "vgg":
            slices, channels = _vgg16_shift_tolerant(), (64, 128, 256, 512, 512)
        else:
            raise ValueError(f"net must be one of {STLPIPS_NETS}, got {net!r}")
        self.net_name = net
        self.scaling_layer = _ScalingLayer()
        self.net = _Trunk(slices)
        for index, channel_count in enumerate(channels):
            self.add_module(f"lin{index}", _LinearHead(channel_count))
        from metaportrait.io.checkpoint import load_weight_file

        self.load_state_dict(load_weight_file(path, f"stlpips-pytorch's {net} weights"), strict=True)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> STLPIPS:
        # A metric: dropout in the heads must stay off.
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance between image batches a and b, each (B, 3, H, W) RGB in [0, 1]. Returns (B,)."""
        assert a.shape == b.shape and a.ndim == 4 and a.shape[1] == 3, (a.shape, b.shape)
        features_a = self.net(self.scaling_layer(2.0 * a - 1.0))
        features_b = self.net(self.scaling_layer(2.0 * b - 1.0))
        heads = [getattr(self, f"lin{index}") for index in range(len(features_a))]
        return lpips_from_features(features_a, features_b, heads)


def lpips_from_features(features_a: list[torch.Tensor], features_b: list[torch.Tensor], heads) -> torch.Tensor:
    """The LPIPS sum over layers: unit-normalise over channels (eps as in LPIPS), squared difference, learned
    1x1 weights, mean over space. Features ``(B, C_l, h_l, w_l)`` per layer; returns ``(B,)``."""
    total = features_a[0].new_zeros(features_a[0].shape[0])
    for head, fa, fb in zip(heads, features_a, features_b, strict=True):
        fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        total = total + head((fa - fb) ** 2).mean(dim=(1, 2, 3))
    return total


# ---------------------------------------------------------------------------------------------------------
# FD-MobileNetV2
# ---------------------------------------------------------------------------------------------------------


class MobileNetV2PooledFeatures(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1280) ImageNet MobileNetV2 pooled features at 224x224.

    Inputs are resized to 224x224 (bilinear, anti-aliased), ImageNet-normalised inside the backbone.
    """

    INPUT_SIZE = 224

    def __init__(self, backbone: MobileNetV2Features | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else MobileNetV2Features()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.ndim == 4 and images.shape[1] == 3, images.shape
        if images.shape[2:] != (self.INPUT_SIZE, self.INPUT_SIZE):
            images = F.interpolate(
                images, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        return self.backbone.pooled(images)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    Same computation as pytorch-fid: if the matrix square root is singular, a small multiple of the identity
    is added to both covariances; a negligible imaginary part from numerical error is dropped.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    difference = mu1 - mu2
    with warnings.catch_warnings():
        # With fewer samples than dimensions the covariances are singular; scipy warns, and a finite result is
        # still the right one (pytorch-fid calls sqrtm with disp=False for the same reason).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covariance_sqrt = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covariance_sqrt).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covariance_sqrt = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covariance_sqrt):
        largest_imaginary = np.max(np.abs(covariance_sqrt.imag))
        if not np.allclose(np.diagonal(covariance_sqrt).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary component ({largest_imaginary:.3g})")
        covariance_sqrt = covariance_sqrt.real
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covariance_sqrt))


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D) (unbiased, as pytorch-fid). Needs N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


@torch.no_grad()
def mobilenetv2_features(
    images: torch.Tensor, extractor: MobileNetV2PooledFeatures | None = None, batch_size: int = 16
) -> np.ndarray:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1280) float64 pooled MobileNetV2 features."""
    extractor = extractor if extractor is not None else MobileNetV2PooledFeatures()
    device = next(extractor.parameters()).device
    chunks = [extractor(batch.to(device)).double().cpu() for batch in _batches(images, batch_size)]
    return torch.cat(chunks).numpy()


def fd_mobilenetv2(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    extractor: MobileNetV2PooledFeatures | None = None,
    batch_size: int = 16,
) -> float:
    """FD-MobileNetV2 between two image sets, each (N, 3, H, W) RGB in [0, 1] with N >= 2 (not FID).

    Like FID it is biased upwards for small N (a few thousand frames is usual in talking-head papers); only
    compare values computed with the same N.
    """
    extractor = extractor if extractor is not None else MobileNetV2PooledFeatures()
    mu_a, sigma_a = gaussian_statistics(mobilenetv2_features(images_a, extractor, batch_size))
    mu_b, sigma_b = gaussian_statistics(mobilenetv2_features(images_b, extractor, batch_size))
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
