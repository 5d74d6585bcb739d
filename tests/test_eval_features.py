"""ST-LPIPS (ported, torchvision-free), MobileNetV2 pooled features and the Fréchet distance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metaportrait.eval.features import (
    STLPIPS,
    MobileNetV2PooledFeatures,
    fd_mobilenetv2,
    frechet_distance,
    gaussian_statistics,
)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, 512, 512)


def _patches(astronaut: torch.Tensor, size: int = 96) -> dict[str, torch.Tensor]:
    """A face patch and variants: identical, shifted by 1 px, noise sigma 0.05, a different patch."""
    y, x = 60, 170
    base = astronaut[:, :, y : y + size, x : x + size]
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    return {
        "base": base,
        "same": base.clone(),
        "shift": astronaut[:, :, y + 1 : y + 1 + size, x : x + size],
        "noise": (base + 0.05 * noise).clamp(0, 1),
        "other": astronaut[:, :, 400 : 400 + size, 0:size],
    }


def test_stlpips_alex_orders_distortions(astronaut):
    metric = STLPIPS("alex")
    patches = _patches(astronaut)
    names = ("same", "shift", "noise", "other")
    with torch.no_grad():
        values = metric(patches["base"].expand(len(names), -1, -1, -1), torch.cat([patches[n] for n in names]))
    scores = dict(zip(names, values.tolist()))
    assert scores["same"] < 1e-9  # batched convolutions can differ in the last bits
    assert 0 < scores["shift"] < 0.02  # shift tolerant: a 1-pixel shift is almost free
    assert scores["shift"] < scores["noise"] < scores["other"]
    assert scores["other"] > 0.4


def test_stlpips_batches_and_stays_frozen(astronaut):
    metric = STLPIPS("alex")
    patches = _patches(astronaut, size=64)
    a = torch.cat([patches["base"], patches["base"]])
    b = torch.cat([patches["same"], patches["other"]])
    with torch.no_grad():
        both = metric(a, b)
        second = metric(patches["base"], patches["other"])
    assert both.shape == (2,)
    torch.testing.assert_close(both[1:], second)
    metric.train()
    assert not metric.training
    assert not any(p.requires_grad for p in metric.parameters())


# The reference: stlpips-pytorch's own code, with stand-ins for the modules it imports but does not use
# (torchvision, IPython, torchsummary). Run in a subprocess so the stand-ins never leak into this process.
_REFERENCE = r"""
import json, sys, types
import torch
for name in ("torchvision", "torchvision.models", "IPython", "torchsummary"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["torchvision"].models = sys.modules["torchvision.models"]
sys.modules["IPython"].embed = None
sys.modules["torchsummary"].summary = None
from stlpips_pytorch import stlpips
torch.set_num_threads(1)
a, b = torch.load(sys.argv[1])
out = {}
for net in sys.argv[2:]:
    model = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)
    with torch.no_grad():
        out[net] = model(a, b, normalize=True).flatten().tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])
def test_stlpips_matches_the_stlpips_pytorch_package(astronaut, tmp_path, net):
    patches = _patches(astronaut, size=48)
    a = torch.cat([patches["base"], patches["base"], patches["base"]])
    b = torch.cat([patches["shift"], patches["noise"], patches["other"]])
    torch.save((a, b), tmp_path / "pair.pt")
    result = subprocess.run(
        [sys.executable, "-c", _REFERENCE, str(tmp_path / "pair.pt"), net], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = STLPIPS(net)(a, b)
    np.testing.assert_allclose(ours.numpy(), reference[net], rtol=1e-4, atol=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
    features = np.random.default_rng(0).normal(size=(50, 6))
    mu, sigma = gaussian_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_closed_form():
    # Covariances sharing eigenvectors: FD = |mu1 - mu2|^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)).
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 0.5, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2.
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_mobilenetv2_pooled_features_shape(astronaut):
    extractor = MobileNetV2PooledFeatures()
    with torch.no_grad():
        features = extractor(astronaut[:, :, :100, :140].expand(2, -1, -1, -1))
    assert features.shape == (2, 1280) and (features >= 0).all()  # ReLU6, then the spatial mean
    torch.testing.assert_close(features[0], features[1])


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


@pytest.mark.slow  # two 1280x1280 matrix square roots: several seconds on 2 busy cores
def test_fd_mobilenetv2_separates_faces_from_noise(astronaut):
    extractor = MobileNetV2PooledFeatures()
    crops = torch.cat([astronaut[:, :, y : y + 128, x : x + 128] for y in (40, 60) for x in (160, 180, 200)])
    near = fd_mobilenetv2(crops[::2], crops[1::2], extractor)
    far = fd_mobilenetv2(crops[::2], torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0)), extractor)
    assert 0 < near < far
