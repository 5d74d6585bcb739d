"""Frozen ImageNet backbones (MobileNetV2 shipped offline, VGG19 from a user file) and FOMM's pyramid loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaportrait.errors import InputError
from metaportrait.losses.perceptual import (
    AntiAliasInterpolation2d,
    MobileNetV2Features,
    PerceptualPyramidLoss,
    VGG19Features,
)
from metaportrait.models.backbones import FrozenBackbone, _vgg19_feature_keys

CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Features:
    return MobileNetV2Features()


def _imagenet_input(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(tensor, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def test_mobilenet_v2_weights_classify_imagenet_images(mobilenet):
    from skimage import data

    with torch.no_grad():
        cat = mobilenet.logits(_imagenet_input(data.chelsea())).argmax().item()
        coffee = mobilenet.logits(_imagenet_input(data.coffee())).argmax().item()
    assert cat in CAT_CLASSES
    assert coffee == ESPRESSO


def test_mobilenet_v2_feature_pyramid_shapes(mobilenet):
    with torch.no_grad():
        features = mobilenet(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (24, 16, 16), (32, 8, 8), (96, 4, 4), (320, 2, 2)]


def test_anti_alias_kernels_match_fomm():
    # FOMM: sigma = (1/s - 1)/2, kernel 2*round(4 sigma)+1.
    for scale, size in ((0.5, 5), (0.25, 13), (0.125, 29)):
        module = AntiAliasInterpolation2d(3, scale)
        assert module.weight.shape == (3, 1, size, size)
        torch.testing.assert_close(module.weight.sum(dim=(1, 2, 3)), torch.ones(3))
    image = torch.full((1, 3, 64, 64), 0.7)
    half = AntiAliasInterpolation2d(3, 0.5)(image)
    assert half.shape == (1, 3, 32, 32)
    # A constant stays constant away from the zero-padded border.
    torch.testing.assert_close(half[..., 2:-2, 2:-2], torch.full_like(half[..., 2:-2, 2:-2], 0.7))
    assert AntiAliasInterpolation2d(3, 1.0)(image) is image
    with pytest.raises(ValueError):
        AntiAliasInterpolation2d(3, 0.3)


class _PixelBackbone(FrozenBackbone):
    """Returns the input itself as the only 'feature map' (for a known-answer test)."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


def test_pyramid_loss_known_answer():
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss = PerceptualPyramidLoss(_PixelBackbone(), scales=(1.0, 0.5), layer_weights=(3.0,))
    half = AntiAliasInterpolation2d(3, 0.5)
    expected = 3.0 * ((a - b).abs().mean() + (half(a) - half(b)).abs().mean())
    torch.testing.assert_close(loss(a, b), expected)


def test_pyramid_loss_is_frozen_and_differentiable(mobilenet):
    loss = PerceptualPyramidLoss(mobilenet, scales=(1.0, 0.5))
    loss.train()
    assert not loss.training and not mobilenet.training
    target = torch.rand(1, 3, 32, 32)
    prediction = target.clone().requires_grad_(True)
    assert loss(prediction, target).item() == 0.0
    value = loss((prediction + 0.1 * torch.randn_like(prediction)).clamp(0, 1), target)
    assert value.ndim == 0 and value.item() > 0
    value.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in mobilenet.parameters())
    # Registered as a submodule, so it follows the loss's .to().
    assert any(name.startswith("backbone.") for name, _ in loss.named_parameters())


def test_pyramid_loss_rejects_mismatched_layer_weights(mobilenet):
    loss = PerceptualPyramidLoss(mobilenet, scales=(1.0,), layer_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="5 feature maps"):
        loss(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def _random_vgg19_state() -> dict[str, torch.Tensor]:
    """A state dict with torchvision's VGG19 layout (random values; the real file is not available offline)."""
    generator = torch.Generator().manual_seed(0)
    state, in_channels = {}, 3
    for key in sorted(_vgg19_feature_keys(), key=lambda k: (int(k.split(".")[1]), k.endswith("weight"))):
        index = int(key.split(".")[1])
        out_channels = {0: 64, 2: 64, 5: 128, 7: 128}.get(index, 256 if index <= 16 else 512)
        if key.endswith("bias"):
            state[key] = torch.zeros(out_channels)
        else:
            state[key] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.05
            in_channels = out_channels
    state["classifier.0.weight"] = torch.zeros(1)  # ignored
    return state


def test_vgg19_loads_torchvision_layout_and_returns_five_relus():
    features = VGG19Features(_random_vgg19_state())
    with torch.no_grad():
        maps = features(torch.rand(1, 3, 32, 32))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert all((m >= 0).all() for m in maps)  # ReLU outputs
    assert not any(p.requires_grad for p in features.parameters())


def test_vgg19_missing_or_wrong_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="vgg19-dcbb9e9d.pth") as error:
        VGG19Features(tmp_path / "missing.pth")
    assert error.value.path.endswith("missing.pth")
    state = _random_vgg19_state()
    del state["features.34.weight"]  # e.g. a different VGG
    with pytest.raises(InputError, match="not a torchvision VGG19"):
        VGG19Features(state)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("hello")
    with pytest.raises(InputError, match="cannot read VGG19 weights"):
        VGG19Features(not_weights)
