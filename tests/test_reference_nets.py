"""The published LPIPS (AlexNet) and FID Inception-v3, with random weight files in the official key layout.

The real files (torchvision's AlexNet, lpips' heads, pytorch-fid's Inception) are not available offline, so
these tests check what can be checked without them: the key/shape layout against an independent description
of the architectures, strict loading and its error messages, and known answers of the metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metaportrait.errors import InputError
from metaportrait.eval.reference_nets import FIDInceptionV3, LPIPSAlex, inception_features

# ---------------------------------------------------------------------------------------------------------
# pt_inception-2015-12-05-6726825d.pth: key names and shapes, written out from the architecture
# (torchvision's Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's FID blocks)
# ---------------------------------------------------------------------------------------------------------


def _conv_bn(prefix: str, cin: int, cout: int, kh: int, kw: int | None = None) -> dict[str, tuple[int, ...]]:
    kw = kh if kw is None else kw
    return {
        f"{prefix}.conv.weight": (cout, cin, kh, kw),
        **{f"{prefix}.bn.{name}": (cout,) for name in ("weight", "bias", "running_mean", "running_var")},
        f"{prefix}.bn.num_batches_tracked": (),
    }


def _block_a(name: str, cin: int, pool: int) -> dict:
    return {**_conv_bn(f"{name}.branch1x1", cin, 64, 1), **_conv_bn(f"{name}.branch5x5_1", cin, 48, 1),
            **_conv_bn(f"{name}.branch5x5_2", 48, 64, 5), **_conv_bn(f"{name}.branch3x3dbl_1", cin, 64, 1),
            **_conv_bn(f"{name}.branch3x3dbl_2", 64, 96, 3), **_conv_bn(f"{name}.branch3x3dbl_3", 96, 96, 3),
            **_conv_bn(f"{name}.branch_pool", cin, pool, 1)}


def _block_c(name: str, c7: int) -> dict:
    shapes = {**_conv_bn(f"{name}.branch1x1", 768, 192, 1), **_conv_bn(f"{name}.branch7x7_1", 768, c7, 1),
              **_conv_bn(f"{name}.branch7x7_2", c7, c7, 1, 7), **_conv_bn(f"{name}.branch7x7_3", c7, 192, 7, 1),
              **_conv_bn(f"{name}.branch7x7dbl_1", 768, c7, 1), **_conv_bn(f"{name}.branch_pool", 768, 192, 1)}
    for index, (cin, cout, kh, kw) in enumerate([(c7, c7, 7, 1), (c7, c7, 1, 7), (c7, c7, 7, 1), (c7, 192, 1, 7)]):
        shapes.update(_conv_bn(f"{name}.branch7x7dbl_{index + 2}", cin, cout, kh, kw))
    return shapes


def _block_e(name: str, cin: int) -> dict:
    return {**_conv_bn(f"{name}.branch1x1", cin, 320, 1), **_conv_bn(f"{name}.branch3x3_1", cin, 384, 1),
            **_conv_bn(f"{name}.branch3x3_2a", 384, 384, 1, 3), **_conv_bn(f"{name}.branch3x3_2b", 384, 384, 3, 1),
            **_conv_bn(f"{name}.branch3x3dbl_1", cin, 448, 1), **_conv_bn(f"{name}.branch3x3dbl_2", 448, 384, 3),
            **_conv_bn(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3),
            **_conv_bn(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1), **_conv_bn(f"{name}.branch_pool", cin, 192, 1)}


def official_inception_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, cin, cout, k in [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3),
                               ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)]:
        shapes.update(_conv_bn(name, cin, cout, k))
    shapes.update({**_block_a("Mixed_5b", 192, 32), **_block_a("Mixed_5c", 256, 64), **_block_a("Mixed_5d", 288, 64)})
    shapes.update({**_conv_bn("Mixed_6a.branch3x3", 288, 384, 3), **_conv_bn("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
                   **_conv_bn("Mixed_6a.branch3x3dbl_2", 64, 96, 3), **_conv_bn("Mixed_6a.branch3x3dbl_3", 96, 96, 3)})
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        shapes.update(_block_c(name, c7))
    shapes.update({**_conv_bn("Mixed_7a.branch3x3_1", 768, 192, 1), **_conv_bn("Mixed_7a.branch3x3_2", 192, 320, 3),
                   **_conv_bn("Mixed_7a.branch7x7x3_1", 768, 192, 1),
                   **_conv_bn("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
                   **_conv_bn("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
                   **_conv_bn("Mixed_7a.branch7x7x3_4", 192, 192, 3)})
    shapes.update({**_block_e("Mixed_7b", 1280), **_block_e("Mixed_7c", 2048)})
    shapes.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    return shapes


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that keep activations in range through 94 conv-BN-ReLU layers (He-scaled convs)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("bn.weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # bn.bias, bn.running_mean, fc
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    return _random_state(official_inception_shapes())


@pytest.fixture(scope="module")
def inception_file(inception_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception_state, path)
    return path


@pytest.fixture(scope="module")
def inception(inception_file) -> FIDInceptionV3:
    return FIDInceptionV3(inception_file)


@pytest.fixture
def one_thread():
    # Inception-v3 at 299x299 is the heaviest network in the fast suite. On a 2-core machine shared with other
    # jobs, two OpenMP threads wait on each other (measured: 16 s for this test instead of about 1 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inception_key_layout_is_pytorch_fids():
    shapes = official_inception_shapes()
    # 94 conv-BN units x 6 tensors (conv weight; BN weight, bias, running mean / var, counter) + fc weight, bias
    assert len(shapes) == 566
    assert sum(not k.endswith("num_batches_tracked") for k in shapes) == 472
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_1.conv.weight"] == (448, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048)


def test_inception_module_mirrors_the_file_layout(inception):
    ours = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    official = official_inception_shapes()
    del official["fc.weight"], official["fc.bias"]  # in the file, not used for features
    assert ours == official


def test_inception_features_shape_determinism_and_batching(inception, one_thread):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = inception(images)  # (2, 2048)
    again = inception_features(images, inception, batch_size=2)  # the same batch through the helper
    one_by_one = inception_features(images, inception, batch_size=1)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features >= 0).all()  # average of ReLU outputs
    assert not torch.allclose(features[0], features[1])
    assert again.dtype == np.float64 and again.shape == (2, 2048)
    np.testing.assert_array_equal(again, features.double().numpy())  # deterministic
    np.testing.assert_allclose(one_by_one, again, rtol=1e-4, atol=1e-5)  # a frame's features ignore its batch


def test_inception_loads_files_without_batchnorm_counters(inception_state, tmp_path):
    # files written before PyTorch 0.4.1 have no num_batches_tracked (unused at inference)
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in inception_state.items() if not k.endswith("num_batches_tracked")}, path)
    model = FIDInceptionV3(path)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, inception_state["Mixed_7c.branch_pool.conv.weight"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", "1 missing keys (Mixed_6b.branch7x7_2.conv.weight)"),
        ("shape", "Conv2d_1a_3x3.conv.weight (32, 3, 5, 5) != (32, 3, 3, 3)"),
        ("unexpected", "1 unexpected keys (AuxLogits.fc.weight)"),
    ],
)
def test_inception_rejects_files_that_do_not_fit(inception_state, tmp_path, change, message):
    state = dict(inception_state)
    if change == "missing":
        del state["Mixed_6b.branch7x7_2.conv.weight"]
    elif change == "shape":
        state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    else:
        state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match="pt_inception") as caught:
        FIDInceptionV3(path)
    assert caught.value.path == str(path) and message in caught.value.problem


def test_weight_files_that_are_not_state_dicts(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(InputError, match="file not found"):
        FIDInceptionV3(missing)
    text = tmp_path / "text.pth"
    text.write_text("not weights")
    with pytest.raises(InputError, match="not a PyTorch weights file") as caught:
        FIDInceptionV3(text)
    assert caught.value.path == str(text)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(InputError, match="not a state dict"):
        FIDInceptionV3(a_list)


# ---------------------------------------------------------------------------------------------------------
# LPIPS (AlexNet, v0.1)
# ---------------------------------------------------------------------------------------------------------


def _reference_lpips(trunk: dict, heads: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out step by step from the lpips package's definition, as an independent check."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def relus(x):
        x = (2 * x - 1 - shift) / scale
        x = F.relu(F.conv2d(x, trunk["features.0.weight"], trunk["features.0.bias"], stride=4, padding=2))
        outputs = [x]
        for index, pool in ((3, True), (6, True), (8, False), (10, False)):
            if pool:
                x = F.max_pool2d(x, 3, 2)
            weight = trunk[f"features.{index}.weight"]
            x = F.relu(F.conv2d(x, weight, trunk[f"features.{index}.bias"], padding=weight.shape[-1] // 2))
            outputs.append(x)
        return outputs

    total = 0
    for layer, (fa, fb) in enumerate(zip(relus(a), relus(b))):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        total = total + F.conv2d((fa - fb) ** 2, heads[f"lin{layer}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


@pytest.fixture(scope="module")
def lpips(lpips_weight_files) -> LPIPSAlex:
    return LPIPSAlex(*lpips_weight_files)


def _images(seed: int, count: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_lpips_matches_the_definition(lpips, lpips_weight_files):
    trunk, heads = (torch.load(path, weights_only=True) for path in lpips_weight_files)
    a, b = _images(0), _images(1)
    with torch.no_grad():
        torch.testing.assert_close(lpips(a, b), _reference_lpips(trunk, heads, a, b), rtol=1e-5, atol=1e-7)


def test_lpips_known_answers(lpips):
    a, b = _images(0, count=3), _images(1, count=3)
    with torch.no_grad():
        same = lpips(a, a.clone())
        ab, ba = lpips(a, b), lpips(b, a)
    assert same.shape == (3,) and torch.equal(same, torch.zeros(3))  # exactly 0
    assert (ab > 0).all()
    torch.testing.assert_close(ab, ba, rtol=1e-6, atol=0)
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.training


def test_lpips_errors_name_the_file(lpips_weight_files, tmp_path):
    alexnet, linear = lpips_weight_files
    with pytest.raises(InputError, match="missing keys .*features.0.bias") as caught:
        LPIPSAlex(linear, linear)  # the heads given as the trunk
    assert caught.value.path == str(linear) and "alexnet-owt-7be5be79.pth" in caught.value.problem
    with pytest.raises(InputError, match="missing keys .*lin0.model.1.weight") as caught:
        LPIPSAlex(alexnet, alexnet)  # the trunk given as the heads
    assert caught.value.path == str(alexnet) and "weights/v0.1/alex.pth" in caught.value.problem
    other = tmp_path / "vgg_heads.pth"  # lpips' vgg.pth has the same names with VGG's channel counts
    torch.save({f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               other)
    with pytest.raises(InputError, match=r"4 keys of the wrong shape"):
        LPIPSAlex(alexnet, other)


def test_metric_models_load_the_reference_networks_only_when_asked(lpips_weight_files, inception_file):
    from metaportrait.eval.protocols import MetricModels

    models = MetricModels.load(lpips_files=lpips_weight_files, fid_inception=inception_file)
    assert isinstance(models.reference_lpips, LPIPSAlex) and isinstance(models.inception, FIDInceptionV3)
    with pytest.raises(InputError, match="file not found"):
        MetricModels.load(fid_inception=inception_file.with_name("absent.pth"))
