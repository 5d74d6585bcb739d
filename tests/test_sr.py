"""Temporal super-resolution network (models/sr.py): shapes, temporal window, initialisation, official layout."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metaportrait.config import SR_PRESETS, SRConfig
from metaportrait.models.sr import TemporalSR, count_flops, temporal_window

# Keys and shapes of the official temporal_gfpgan.pth (copied from ../shared/reference/official, 22 KB).
OFFICIAL_TSV = Path(__file__).parent / "data" / "sr_temporal_gfpgan.tsv"


def _tiny(**changes) -> TemporalSR:
    torch.manual_seed(0)
    return TemporalSR(SR_PRESETS["tiny"].replace(**changes)).eval()


def test_shapes_and_range():
    model = _tiny()
    frames = torch.rand(5, 3, 32, 32)
    out, rgbs = model(frames, return_rgb=True)
    assert out.shape == (5, 3, 64, 64)
    assert 0 <= out.min() and out.max() <= 1
    assert [r.shape[-1] for r in rgbs] == [8, 16, 32]
    with pytest.raises(AssertionError):
        model(torch.rand(2, 3, 64, 64))


def test_temporal_window_replicates_edges():
    frames = torch.arange(1, 6, dtype=torch.float32).view(5, 1, 1, 1)  # frames 1..5, one channel
    window = temporal_window(frames).view(5, 3).tolist()
    assert window == [[1, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 5]]
    single = temporal_window(frames[:1]).view(1, 3).tolist()
    assert single == [[1, 1, 1]]


def test_zero_init_temporal_layers_give_the_per_frame_network():
    model = _tiny()
    frames = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        clip = model(frames)
        per_frame = torch.cat([model(f[None]) for f in frames])
        without = TemporalSR(model.cfg.replace(temporal=False)).eval()
        without.load_state_dict(model.state_dict(), strict=False)
        plain = without(frames)
    torch.testing.assert_close(clip, per_frame, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip, plain, atol=1e-5, rtol=0)


def test_trained_temporal_layers_mix_neighbours_only():
    model = _tiny()
    with torch.no_grad():
        for layer in [*model.window_down, *model.recurrent_forward]:
            layer.conv2.weight.normal_(0, 0.1)
        for to_rgb in [model.stylegan_decoder.to_rgb1, *model.stylegan_decoder.to_rgbs]:
            to_rgb.modulated_conv.weight.normal_(0, 0.1)  # the residual preset starts them at zero
    frames = torch.rand(12, 3, 32, 32)
    changed = frames.clone()
    changed[0] = torch.rand(3, 32, 32)
    with torch.no_grad():
        a, b = model(frames), model(changed)
    diff = (a - b).flatten(1).abs().amax(1)
    reach = model.num_temporal_layers()  # frame 0 can influence frames 1 .. reach, not further
    assert diff[1] > 0 and diff[reach + 1:].max() == 0


def test_residual_preset_starts_as_plain_upsampling():
    model = _tiny()
    frames = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(frames)
    plain = F.interpolate(frames, size=64, mode=model.cfg.residual_mode, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


def test_detail_body_starts_at_zero_and_learns_from_the_first_step():
    model = _tiny()
    assert model.cfg.detail_channels and model.cfg.decoder_side < model.cfg.output_size  # both lite features
    frames, target = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 64, 64)
    plain = F.interpolate(frames, size=64, mode=model.cfg.residual_mode, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(model(frames), plain, atol=1e-5, rtol=0)  # exactly the upsampling at init
    (model(frames) - target).abs().mean().backward()
    assert model.detail_body.tail.weight.grad.abs().sum() > 0  # the path around the decoder gets a gradient at once
    with pytest.raises(ValueError, match="detail_channels"):
        SRConfig(unet_size=512, residual=True, detail_channels=8)
    with pytest.raises(ValueError, match="decoder_size"):
        SRConfig(decoder_size=128)


def test_official_layout_matches_the_reference_listing():
    with torch.device("meta"):
        model = TemporalSR(SR_PRESETS["official"])
    with OFFICIAL_TSV.open() as handle:
        reference = {row["key"]: row["shape"] for row in csv.DictReader(handle, delimiter="\t")}
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    assert {k: str(list(v.shape)) for k, v in state.items()} == reference


def test_lite_is_cheap_enough():
    model = TemporalSR(SR_PRESETS["lite"])
    assert count_flops(model, frames=1) <= 10e9
    assert sum(p.numel() for p in model.parameters()) * 4 < 25e6


def test_config_round_trip_and_checks():
    for cfg in SR_PRESETS.values():
        assert SRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="half the decoder"):
        SR_PRESETS["tiny"].replace(decoder_channels=(8, 8, 8, 16))
    with pytest.raises(ValueError, match="unknown keys"):
        SRConfig.from_dict({**SR_PRESETS["tiny"].to_dict(), "extra": 1})


def test_basicsr_file_loads_in_one_call(tmp_path):
    from metaportrait.errors import InputError
    from metaportrait.io.convert_official import load_official_sr

    cfg = SR_PRESETS["tiny"]
    model = _tiny()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "net_g.pth"
    torch.save({"params": {k: torch.zeros_like(v) for k, v in state.items()}, "params_ema": state}, path)
    loaded = load_official_sr(path, cfg)
    frames = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames), model(frames))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        load_official_sr(bad, cfg)
    torch.save({"params": {"conv_body_first.weight": torch.zeros(1)}}, bad)
    with pytest.raises(InputError, match="layout does not match"):
        load_official_sr(bad, cfg)
