"""Base generator / discriminator: official checkpoint layouts, converter, tiny-preset behaviour, lite FLOP budget."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from metaportrait.config import PRESETS, DiscriminatorConfig, ModelConfig, RefineConfig, WarpConfig
from metaportrait.io.checkpoint import load_model, save_model
from metaportrait.io.convert_official import load_official_checkpoint
from metaportrait.models.blocks import make_coordinate_grid, remove_all_spectral_norms
from metaportrait.models.discriminator import MultiScaleDiscriminator
from metaportrait.models.generator import Generator, example_inputs
from metaportrait.models.refine import mouth_mask

TINY = PRESETS["tiny"]

# The official structure (identity seed, spectral norm, InstanceNorm, gaze + mouth conditioning) at 32², for tests
# that must run the official code path.
TINY_OFFICIAL = dataclasses.replace(
    PRESETS["official"],
    image_size=32,
    identity_dim=16,
    warp=WarpConfig(input_size=32, encoder_channels=(4, 8, 8), motion_dim=8, block_expansion=2, max_features=8,
                    num_blocks=3, dec_lease=1, film_hidden=8),
    refine=RefineConfig(block_expansion=2, max_features=8, block_channels=(8, 8, 8, 4, 4), spade_hidden=4),
    discriminator=DiscriminatorConfig(block_expansion=2, max_features=8, num_blocks=3),
)


def read_listing(path) -> dict[str, tuple[int, ...]]:
    """Parse an official state-dict listing (TSV: key, shape, dtype, numel, kind) into {key: shape}."""
    rows = path.read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["key", "shape"]
    return {key: tuple(json.loads(shape)) for key, shape, *_ in (row.split("\t") for row in rows[1:])}


def state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}




# ---------------------------------------------------------------------------------------------------------------
# Official layouts


def test_official_generator_matches_listing(official_reference):
    with torch.device("meta"):  # 130 M parameters: shapes only, no memory
        generator = Generator(PRESETS["official"])
    expected = read_listing(official_reference / "base_generator.tsv")
    assert len(expected) == 436
    assert state_shapes(generator) == expected


def test_official_generator_without_spectral_norm_matches_listing(official_reference):
    with torch.device("meta"):
        generator = Generator(PRESETS["official"].replace(spectral_norm=False))
    expected = read_listing(official_reference / "base_generator_remove_sn.tsv")
    assert len(expected) == 386
    assert state_shapes(generator) == expected


def test_official_discriminator_matches_listing(official_reference):
    discriminator = MultiScaleDiscriminator(PRESETS["official"].discriminator)
    assert state_shapes(discriminator) == read_listing(official_reference / "base_discriminator.tsv")


def test_official_sn_removed_checkpoint_loads_in_one_call(official_reference, tmp_path):
    # A fake meta-trained checkpoint: the 386-key layout with random tensors, DDP prefixes, training wrapper.
    g = torch.Generator().manual_seed(0)
    generator_state = {
        f"module.{k}": torch.randn(shape, generator=g)
        for k, shape in read_listing(official_reference / "base_generator_remove_sn.tsv").items()
    }
    discriminator_state = {
        k: torch.randn(shape, generator=g)
        for k, shape in read_listing(official_reference / "base_discriminator.tsv").items()
    }
    path = tmp_path / "ckpt_meta.pth.tar"
    torch.save({"generator": generator_state, "discriminator": discriminator_state, "epoch": 3,
                "optimizer_generator": {"state": {}, "param_groups": []}}, path)

    generator, discriminator = load_official_checkpoint(path)

    assert generator.cfg.spectral_norm is False
    loaded = generator.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in generator_state.items())
    assert all(torch.equal(discriminator.state_dict()[k], v) for k, v in discriminator_state.items())


# ---------------------------------------------------------------------------------------------------------------
# Converter rules on the official structure at 32²


def _trained_official_tiny() -> Generator:
    torch.manual_seed(1)
    generator = Generator(TINY_OFFICIAL)
    with torch.no_grad():  # a few train-mode passes move the spectral-norm u, v away from their initial values
        for seed in range(3):
            generator(**example_inputs(TINY_OFFICIAL, seed=seed))
    return generator.eval()


@pytest.mark.parametrize("remove_sn", [False, True], ids=["436-layout", "386-layout"])
def test_official_converter_round_trip_gives_identical_outputs(tmp_path, remove_sn):
    generator = _trained_official_tiny()
    inputs = example_inputs(TINY_OFFICIAL, seed=7)
    with torch.no_grad():
        expected = generator(**inputs)["output"]
    saved = remove_all_spectral_norms(copy.deepcopy(generator)) if remove_sn else generator
    state = saved.state_dict()
    assert any(k.endswith("weight_u") for k in state) != remove_sn
    discriminator = MultiScaleDiscriminator(TINY_OFFICIAL.discriminator)
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"generator": {f"module.{k}": v for k, v in state.items()},
                "discriminator": discriminator.state_dict()}, path)

    loaded, _ = load_official_checkpoint(path, cfg=TINY_OFFICIAL)

    assert loaded.cfg.spectral_norm is not remove_sn
    with torch.no_grad():
        actual = loaded(**inputs)["output"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_official_converter_rejects_foreign_layout(tmp_path):
    path = tmp_path / "other.pth.tar"
    torch.save({"generator": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(Exception, match="layout does not match"):
        load_official_checkpoint(path, cfg=TINY_OFFICIAL)


def test_official_structure_requires_driving_keypoints():
    generator = Generator(TINY_OFFICIAL)
    inputs = example_inputs(TINY_OFFICIAL)
    with torch.no_grad():
        out = generator(**inputs)
        assert out["output"].shape == (2, 3, 32, 32)
        assert 0 <= out["output"].min() and out["output"].max() <= 1
        inputs.pop("driving_keypoints")
        assert generator(**inputs, stage="warp")["warped"].shape == (2, 3, 32, 32)  # warp stage does not need them
        with pytest.raises(ValueError, match="driving_keypoints"):
            generator(**inputs)


def test_mouth_mask_is_the_padded_official_box():
    keypoints = torch.zeros(1, 58, 2)
    keypoints[0, 14, 0], keypoints[0, 15, 0] = -0.5, 0.25  # x: pixels 16 .. 40 at width 64
    keypoints[0, 56, 1], keypoints[0, 57, 1] = 0.0, 0.5  # y: pixels 32 .. 48
    mask = mouth_mask(keypoints, (64, 64))[0, 0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert (xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()) == (11, 45, 27, 53)
    assert mask.sum().item() == 35 * 27


# ---------------------------------------------------------------------------------------------------------------
# Tiny preset (the lite structure)


def test_tiny_forward_shapes_and_ranges():
    generator = Generator(TINY)
    inputs = example_inputs(TINY)
    with torch.no_grad():
        warp = generator(**inputs, stage="warp")
        full = generator(**inputs, stage="full")
    assert "output" not in warp
    assert warp["deformation"].shape == (2, 64, 64, 2)
    assert warp["occlusion"].shape == (2, 1, 64, 64)
    assert warp["warped"].shape == full["output"].shape == full["generated"].shape == (2, 3, 64, 64)
    for key in ("warped", "output", "generated", "occlusion"):
        assert 0 <= full[key].min() and full[key].max() <= 1, key
    assert torch.isfinite(full["deformation"]).all()


def test_tiny_runs_at_other_multiples_of_32():
    generator = Generator(TINY)
    with torch.no_grad():
        out = generator(**example_inputs(TINY, batch=1, size=96))
    assert out["output"].shape == (1, 3, 96, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        generator(**example_inputs(TINY, batch=1, size=80))


def test_tiny_step_zero_equals_mesh_prior_warp():
    generator = Generator(TINY)
    inputs = example_inputs(TINY, prior_noise=0.1)
    with torch.no_grad():
        out = generator(**inputs, stage="warp")
    torch.testing.assert_close(out["deformation"], inputs["prior_grid"], rtol=0, atol=0)
    expected = F.grid_sample(inputs["source"], inputs["prior_grid"], mode="bilinear",
                             padding_mode=TINY.warp.padding_mode, align_corners=False)
    torch.testing.assert_close(out["warped"], expected, rtol=0, atol=0)


def test_tiny_one_step_trains_both_networks():
    torch.manual_seed(0)
    generator = Generator(TINY)
    inputs = example_inputs(TINY)
    target = torch.rand(2, 3, 64, 64)
    before = copy.deepcopy(generator.state_dict())
    optimizer = torch.optim.Adam(
        [{"params": generator.warp_parameters(), "lr": 1e-3}, {"params": generator.refine_parameters(), "lr": 1e-3}]
    )
    loss = F.l1_loss(generator(**inputs)["output"], target)
    loss.backward()
    # Every decoder parameter receives a gradient; the warp net learns through its (zero-initialised) heads first.
    names = [n for n, p in generator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not [n for n in names if n.startswith(("SPDAE_G", "feature_encoder", "fuse_high_res"))], names
    optimizer.step()
    after = generator.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert "dense_motion_network.reger.2.weight" in changed
    assert "dense_motion_network.occlusion_net.2.weight" in changed
    assert "SPDAE_G.conv_img.weight" in changed and "ladder_network.fc.weight" not in changed
    assert F.l1_loss(generator(**inputs)["output"], target) < loss


def test_parameter_groups_partition_the_generator():
    generator = Generator(TINY)
    warp = {id(p) for p in generator.warp_parameters()}
    refine = {id(p) for p in generator.refine_parameters()}
    assert not warp & refine
    assert warp | refine == {id(p) for p in generator.parameters()}


def test_tiny_save_load_round_trip(tmp_path):
    generator = Generator(TINY).eval()
    inputs = example_inputs(TINY)
    save_model(tmp_path / "ckpt", generator, TINY, extra_meta={"step": 12})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded, cfg = load_model(tmp_path / "ckpt")
    assert cfg == TINY
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)["output"], generator(**inputs)["output"], rtol=0, atol=0)


def test_without_identity_branch():
    cfg = TINY.replace(use_identity=False)
    generator = Generator(cfg)
    assert not [n for n, _ in generator.named_parameters() if "adain" in n or "mlp_attention" in n]
    assert [n for n, _ in Generator(TINY).named_parameters() if "adain" in n]
    inputs = example_inputs(cfg)
    assert "identity" not in inputs
    with torch.no_grad():
        assert generator(**inputs)["output"].shape == (2, 3, 64, 64)
        with pytest.raises(ValueError, match="identity"):
            generator(**inputs, identity=torch.zeros(2, cfg.identity_dim))


def test_missing_inputs_fail_loudly():
    generator = Generator(TINY)
    inputs = example_inputs(TINY)
    with pytest.raises(ValueError, match="prior_grid"):
        generator(**{**inputs, "prior_grid": None})
    with pytest.raises(ValueError, match="identity"):
        generator(**{**inputs, "identity": None})
    with pytest.raises(ValueError, match="stage"):
        generator(**inputs, stage="Refine")
    with pytest.raises(ValueError, match="prior_masks"):
        generator(**{**inputs, "prior_masks": None})
    with pytest.raises(ValueError, match="prior_masks"):
        generator(**{**inputs, "prior_masks": inputs["prior_masks"][:, :1]})
    no_prior = Generator(TINY.replace(use_mesh_prior=False, prior_masks=False))
    with pytest.raises(ValueError, match="prior_grid"):
        no_prior(**{k: v for k, v in inputs.items() if k != "prior_masks"})


def _with_trained_heads(cfg):
    """A generator whose flow head is no longer zero, so its residual flow is not zero either."""
    torch.manual_seed(0)
    generator = Generator(cfg).eval()
    head = generator.dense_motion_network.reger[2]
    torch.nn.init.normal_(head.weight, std=0.5)
    return generator


def test_prior_masks_keep_the_mesh_in_the_face_and_synthesise_the_mouth():
    generator = _with_trained_heads(TINY)
    inputs = example_inputs(TINY)
    ones, zeros = torch.ones(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    with torch.no_grad():
        free = generator(**{**inputs, "prior_masks": torch.cat([zeros, zeros], 1)})
        face = generator(**{**inputs, "prior_masks": torch.cat([ones, zeros], 1)})
        mouth = generator(**{**inputs, "prior_masks": torch.cat([zeros, ones], 1)})
    assert (free["deformation"] - inputs["prior_grid"]).abs().max() > 1e-3  # the residual is active ...
    torch.testing.assert_close(face["deformation"], inputs["prior_grid"], rtol=0, atol=0)  # ... but not in the face
    torch.testing.assert_close(mouth["output"], mouth["generated"], rtol=0, atol=0)  # mouth: all synthesised
    assert (free["output"] - free["generated"]).abs().max() > 1e-3
    # Without masks (an older checkpoint's config), the model behaves as with all-zero masks.
    plain = Generator(TINY.replace(prior_masks=False)).eval()
    plain.load_state_dict(generator.state_dict())
    with torch.no_grad():
        old = plain(**{k: v for k, v in inputs.items() if k != "prior_masks"})
    torch.testing.assert_close(old["output"], free["output"])


def test_subtract_source_flow_keeps_a_still_source_still():
    """With ``warp.subtract_source_flow`` a source driving itself gets exactly the mesh prior (the identity), and
    any other driver's flow moves by the same per-source bias; without it the trained head's flow is not zero."""
    cfg = TINY.replace(warp=dataclasses.replace(TINY.warp, subtract_source_flow=True))
    generator = Generator(cfg).eval()
    generator.load_state_dict(_with_trained_heads(TINY).state_dict())  # no new weights
    plain = _with_trained_heads(TINY)
    inputs = example_inputs(cfg)
    identity = make_coordinate_grid(64, 64, "centers")[None].repeat(2, 1, 1, 1)
    still = {**inputs, "driving_lines": inputs["source_lines"], "prior_grid": identity,
             "prior_masks": torch.zeros_like(inputs["prior_masks"])}  # fmt: skip
    with torch.no_grad():
        assert (plain(**still)["deformation"] - identity).abs().max() > 1e-3
        torch.testing.assert_close(generator(**still)["deformation"], identity, rtol=0, atol=1e-6)
        source_flow = generator.source_flow(inputs["source"], inputs["source_lines"])
        assert source_flow.shape == plain(**inputs)["flow"].shape
        given, computed = generator(**inputs, source_flow=source_flow), generator(**inputs)
        torch.testing.assert_close(given["output"], computed["output"], rtol=0, atol=0)
        assert (computed["output"] - plain(**inputs)["output"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="subtract_source_flow"):
        plain(**inputs, source_flow=source_flow)
    data = cfg.to_dict()
    del data["warp"]["subtract_source_flow"]  # a config from before the option: off
    assert ModelConfig.from_dict(data) == TINY


def test_smooth_upscale_removes_the_sub_pixel_checkerboard():
    """Sub-pixel phases that disagree give a period-2 checkerboard; the [1, 2, 1] filter leaves their mean, adds no
    weights, and is off in configs from before it."""
    smooth_cfg = TINY.replace(refine=dataclasses.replace(TINY.refine, smooth_upscale=True))
    plain, smooth = Generator(TINY).eval(), Generator(smooth_cfg).eval()
    smooth.load_state_dict(plain.state_dict())
    assert smooth.SPDAE_G.upscale == 2
    for generator in (plain, smooth):
        conv = generator.SPDAE_G.conv_img  # output channel c * 4 + phase, phases (0,0), (0,1), (1,0), (1,1)
        torch.nn.init.zeros_(conv.weight)
        conv.bias.data = torch.tensor([1.0, -1.0, -1.0, 1.0]).repeat(3)
    with torch.no_grad():
        checkered = torch.logit(plain(**example_inputs(TINY))["generated"])
        flat = torch.logit(smooth(**example_inputs(smooth_cfg))["generated"])
    torch.testing.assert_close(checkered[..., ::2, ::2], torch.ones_like(checkered[..., ::2, ::2]))
    torch.testing.assert_close(checkered[..., ::2, 1::2], -torch.ones_like(checkered[..., ::2, 1::2]))
    torch.testing.assert_close(flat[..., 1:-1, 1:-1], torch.zeros_like(flat[..., 1:-1, 1:-1]), rtol=0, atol=1e-5)
    data = smooth_cfg.to_dict()
    del data["refine"]["smooth_upscale"]
    assert ModelConfig.from_dict(data) == TINY
    with pytest.raises(ValueError, match="smooth_upscale"):
        dataclasses.replace(TINY.refine, dec_lease=0, smooth_upscale=True)


def test_gain_map_starts_at_one_is_smooth_and_scales_only_the_warped_image():
    """The gain head starts at zero (a model without it computes the same); trained, its map is bilinear between
    grid cells, bounded to [0.5, 1.5], and multiplies the warped image in the blend, not the synthesis."""
    grid = 4
    gain_cfg = TINY.replace(refine=dataclasses.replace(TINY.refine, gain_map_grid=grid))
    plain, gained = Generator(TINY).eval(), Generator(gain_cfg).eval()
    missing, unexpected = gained.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["SPDAE_G.conv_gain.bias", "SPDAE_G.conv_gain.weight"]
    inputs = example_inputs(TINY, size=64)
    with torch.no_grad():
        before, start = plain(**inputs), gained(**inputs)
        torch.testing.assert_close(start["output"], before["output"], rtol=0, atol=0)
        assert torch.equal(start["gain"], torch.ones_like(start["gain"]))
        torch.nn.init.normal_(gained.SPDAE_G.conv_gain.weight, std=0.1)
        out = gained(**inputs)
    gain = out["gain"]
    assert gain.shape == (2, 3, 64, 64) and 0.5 <= gain.min() and gain.max() <= 1.5 and gain.std() > 0.05
    # Smooth: before the tanh the map is bilinear between the 4 x 4 cell centres (pixels 7.5 + 16 k at 64²), so
    # along a row its second difference vanishes except next to those centres.
    logits = torch.atanh((gain.double() - 1) / 0.5)
    second = logits[..., :-2] - 2 * logits[..., 1:-1] + logits[..., 2:]  # centred on pixels 1..62
    kinks = [c + d for c in (7, 23, 39, 55) for d in (0, 1)]
    linear = [i for i in range(1, 63) if i not in kinks]
    at_kinks, elsewhere = (second[..., [i - 1 for i in columns]].abs().max() for columns in (kinks, linear))
    assert elsewhere < 0.01 * at_kinks, (elsewhere, at_kinks)  # float32 rounding only, amplified by the atanh
    occlusion = out["occlusion"]
    expected = occlusion * (out["warped"] * gain).clamp(0, 1) + (1 - occlusion) * out["generated"]
    torch.testing.assert_close(out["output"], expected)
    torch.testing.assert_close(out["generated"], start["generated"])
    data = gain_cfg.to_dict()
    del data["refine"]["gain_map_grid"]  # a config from before the option: no gain map
    assert ModelConfig.from_dict(data) == TINY
    with pytest.raises(ValueError, match="gain_map_grid"):
        dataclasses.replace(TINY.refine, gain_map_grid=-1)


def test_config_from_before_prior_masks_loads_with_them_off():
    data = TINY.to_dict()
    del data["prior_masks"]
    assert ModelConfig.from_dict(data) == TINY.replace(prior_masks=False)
    del data["use_mesh_prior"]
    with pytest.raises(ValueError, match="use_mesh_prior"):
        ModelConfig.from_dict(data)


def test_the_face_masked_prior_is_an_option_older_configs_load_without():
    masked = PRESETS["lite"].replace(prior_face_masked=True)
    assert ModelConfig.from_dict(masked.to_dict()) == masked
    data = masked.to_dict()
    del data["prior_face_masked"]
    assert ModelConfig.from_dict(data) == PRESETS["lite"]
    with pytest.raises(ValueError, match="prior_face_masked needs use_mesh_prior"):
        PRESETS["official"].replace(prior_face_masked=True)


def test_line_width_follows_the_image_size_the_model_was_trained_at():
    lite, official = PRESETS["lite"], PRESETS["official"]
    scaled = lite.replace(line_reference_size=128)
    assert [scaled.line_thickness(s) for s in (64, 128, 256, 512)] == [1, 1, 2, 4]
    assert lite.line_thickness(256) == 1  # the preset keeps 1-px lines (docs/model_card.md)
    assert official.line_thickness(256) == official.line_thickness(512) == 1
    data = scaled.to_dict()
    del data["line_reference_size"]  # a config written before the field: 1-px lines, as it was trained
    assert ModelConfig.from_dict(data).line_thickness(256) == 1
    with pytest.raises(ValueError, match="line_reference_size"):
        lite.replace(line_reference_size=4)


def test_mouth_discriminator_scores_mouth_crops_with_their_lines():
    from metaportrait.models.discriminator import MouthDiscriminator

    critic = MouthDiscriminator()
    features, prediction = critic(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert len(features) == 3 and prediction.shape == (2, 1, 2, 2)
    with pytest.raises(AssertionError):
        critic(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16))


def test_discriminator_tiny_outputs():
    discriminator = MultiScaleDiscriminator(TINY.discriminator)
    outputs = discriminator(torch.rand(2, 3, 64, 64))
    assert len(outputs) == len(TINY.discriminator.scales) == 2
    features, prediction = outputs[0]
    assert len(features) == TINY.discriminator.num_blocks
    assert prediction.shape[:2] == (2, 1) and outputs[1][1].shape[-1] < prediction.shape[-1]


# ---------------------------------------------------------------------------------------------------------------
# Config and budget


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_rejects_unknown_and_invalid_keys():
    data = TINY.to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        ModelConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ValueError, match="missing keys"):
        ModelConfig.from_dict({k: v for k, v in data.items() if k != "norm"})
    with pytest.raises(ValueError, match="not one of"):
        ModelConfig.from_dict({**data, "norm": "group"})
    with pytest.raises(ValueError, match="multiple of 32"):
        TINY.replace(image_size=100)


def test_lite_flops_per_frame_within_budget():
    cfg = PRESETS["lite"]
    generator = Generator(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generator(**example_inputs(cfg, batch=1, size=256))
    assert counter.get_total_flops() / 1e9 <= 2.2


def test_cached_source_features_give_the_same_output():
    # The pipeline encodes the portrait once (`encode_source`, batch 1) and reuses it for every frame.
    torch.manual_seed(0)
    generator = Generator(PRESETS["lite"]).eval()
    inputs = example_inputs(PRESETS["lite"], batch=3)
    inputs["source"] = inputs["source"][:1].expand(3, -1, -1, -1)
    with torch.no_grad():
        plain = generator(**inputs)["output"]
        cached = generator(**inputs, source_levels=generator.encode_source(inputs["source"][:1]))["output"]
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)


def test_condition_maps_reuse_the_lines_the_warping_input_resized():
    # `Generator.forward` hands the warping input's line images to `condition_maps` instead of resizing them again.
    from metaportrait.models.blocks import resize_map
    from metaportrait.models.refine import condition_maps

    cfg = PRESETS["lite"].refine
    assert cfg.antialias
    torch.manual_seed(0)
    levels = [torch.rand(2, 4, size, size) for size in (32, 64, 128)]
    occlusion = torch.rand(2, 1, 256, 256)
    source_lines, driving_lines = torch.rand(2, 3, 256, 256), torch.rand(2, 3, 256, 256)
    resized = {(128, 128): (resize_map(source_lines, (128, 128), True), resize_map(driving_lines, (128, 128), True))}
    plain = condition_maps(levels, occlusion, source_lines, driving_lines, None, cfg)
    reused = condition_maps(levels, occlusion, source_lines, driving_lines, None, cfg, None, resized)
    for a, b in zip(plain, reused, strict=True):
        assert torch.equal(a, b)
    marked = {(64, 64): (torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64))}  # and they are used as given
    level_64 = condition_maps(levels, occlusion, source_lines, driving_lines, None, cfg, None, marked)[1]
    assert torch.equal(level_64[:, 5:8], torch.zeros(2, 3, 64, 64))  # after 4 feature channels and the occlusion
