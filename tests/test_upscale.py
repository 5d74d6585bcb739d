"""Face super-resolution at inference (metaportrait.upscale): streaming, `animate --sr`, `upscale`, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaportrait.cli import main
from metaportrait.config import PRESETS, SR_PRESETS
from metaportrait.io.checkpoint import save_sr_model
from metaportrait.models.generator import Generator
from metaportrait.models.sr import SRStream, TemporalSR
from metaportrait.pipeline import Animator
from metaportrait.upscale import StreamingSR

# The tiny SR structure at 64 -> 128: the input size of the tiny base model's crops.
SR64 = SR_PRESETS["tiny"].replace(input_size=64, output_size=128, unet_size=64, unet_channels=(4, 4, 4, 4, 4),
                                  decoder_size=64, decoder_channels=(8, 8, 8, 8, 8))


def _trained_like(cfg) -> TemporalSR:
    """A network whose temporal layers and RGB heads are not zero (as after training)."""
    torch.manual_seed(0)
    model = TemporalSR(cfg).eval()
    with torch.no_grad():
        for layer in [*model.window_down, *model.recurrent_forward] if cfg.temporal else []:
            layer.conv2.weight.normal_(0, 0.1)
        for to_rgb in [model.stylegan_decoder.to_rgb1, *model.stylegan_decoder.to_rgbs]:
            to_rgb.modulated_conv.weight.normal_(0, 0.1)
        if cfg.detail_channels:
            model.detail_body.tail.weight.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def sr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sr64")
    save_sr_model(folder, _trained_like(SR64), SR64)
    return folder


TINY_VARIANTS = [SR_PRESETS["tiny"], SR_PRESETS["tiny"].replace(temporal=False),
                 SR_PRESETS["tiny"].replace(detail_channels=0)]


@pytest.mark.parametrize("cfg", TINY_VARIANTS, ids=["tiny", "no-temporal", "no-detail"])
@pytest.mark.parametrize("frames", [1, 2, 15])
def test_sr_stream_equals_the_whole_clip_however_it_is_pushed(cfg, frames):
    model = _trained_like(cfg)
    clip = torch.rand(frames, 3, 32, 32, generator=torch.Generator().manual_seed(frames))
    rng = np.random.default_rng(frames)
    with torch.no_grad():
        whole = model(clip)
        for sizes in ([frames], [1] * frames, None):
            if sizes is None:  # random sizes, empty pushes included
                sizes = [int(k) for k in rng.multinomial(frames, np.ones(5) / 5)]
            stream, outputs, start = SRStream(model), [], 0
            for size in sizes:
                outputs.append(stream.push(clip[start:start + size]))
                start += size
            outputs.append(stream.push(clip[:0], final=True))
            streamed = torch.cat(outputs)
            assert streamed.shape == whole.shape, sizes
            assert (streamed - whole).abs().max() < 1e-5, sizes
            # Each frame is out once frame t + L is in (L = temporal layers; at least 1 with a detail body).
            reach = max(model.num_temporal_layers(), 1 if cfg.detail_channels else 0)
            assert len(torch.cat(outputs[:-1])) == max(0, frames - reach)
        with pytest.raises(RuntimeError, match="after the final"):
            stream.push(clip[:1])


@pytest.mark.parametrize(("chunk", "context"), [(1, None), (7, None), (40, None), (7, "reach")])
def test_streaming_equals_one_clip(chunk, context):
    model = _trained_like(SR_PRESETS["tiny"])
    frames = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(17)]
    clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        whole = (model(clip).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    context = model.num_temporal_layers() if context == "reach" else context  # windows as wide as the reach
    sr = StreamingSR(model, chunk=chunk, context=context)
    assert sr.exact_stream == (context is None)
    streamed = np.stack(list(sr.upscale(frames)))
    # Equal up to float rounding (conv kernels differ with the batch size): at most 1 grey level, rarely.
    difference = np.abs(streamed.astype(int) - whole)
    assert difference.max() <= 1 and difference.mean() < 1e-3


def test_bf16_streaming_stays_near_fp32():
    model = _trained_like(SR64)
    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(5)]
    exact = np.stack(list(StreamingSR(model, chunk=2, context=1).upscale(frames))).astype(int)
    fast = np.stack(list(StreamingSR(model, chunk=2, context=1, precision="bf16").upscale(frames))).astype(int)
    assert np.abs(exact - fast).mean() < 1.0 and np.abs(exact - fast).max() <= 16
    with pytest.raises(ValueError, match="precision"):
        StreamingSR(model, precision="auto")  # resolved by the caller (`metaportrait.pipeline.resolve_precision`)


@pytest.mark.parametrize("context", [None, 2])
def test_streaming_memory_is_flat_and_order_is_kept(context):
    model = TemporalSR(SR_PRESETS["tiny"])
    sr = StreamingSR(model, chunk=3, context=context)
    ahead = sr.chunk + (model.num_temporal_layers() if context is None else context)
    read = []

    def frames():
        for index in range(30):
            read.append(index)
            yield np.zeros((32, 32, 3), np.uint8), index

    outputs = 0
    for out, index in sr.stream(frames()):
        assert out.shape == (64, 64, 3) and index == outputs
        assert len(read) - index <= ahead  # never more than a chunk and the temporal reach read ahead
        outputs += 1
    assert outputs == 30
    assert [i for _, i in sr.stream((np.zeros((32, 32, 3), np.uint8), i) for i in range(5))] == list(range(5))
    assert list(sr.stream(iter(()))) == []


def test_animator_with_sr_pastes_a_larger_face(sr_folder, tmp_path):
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image
    from metaportrait.demo_motion import scripted_motion
    from metaportrait.io.checkpoint import save_model

    tiny = PRESETS["tiny"]
    torch.manual_seed(0)
    save_model(tmp_path / "base", Generator(tiny), tiny)
    animator = Animator.from_pretrained(tmp_path / "base", sr=sr_folder)
    image = data.astronaut()
    points = landmarks_of_image(image, "astronaut")
    targets = list(scripted_motion(points, 5))
    crops = list(animator.animate_landmarks(image, targets, paste_back=False, source_landmarks=points))
    assert len(crops) == 5 and crops[0].shape == (128, 128, 3)
    frames = list(animator.animate_landmarks(image, targets, source_landmarks=points))
    assert len(frames) == 5 and frames[0].shape == image.shape and animator.stats.frames == 5


@pytest.mark.parametrize("case", ["missing", "corrupt", "not_bundled", "wrong_size"])
def test_animate_sr_bad_weights_is_one_error_line(case, tmp_path, capsys, monkeypatch):
    from metaportrait import upscale
    from metaportrait.io.checkpoint import save_model
    from metaportrait.io.image import write_image

    tiny = PRESETS["tiny"]
    save_model(tmp_path / "base", Generator(tiny), tiny)
    write_image(tmp_path / "face.png", np.full((64, 64, 3), 128, np.uint8))
    sr = tmp_path / "sr"
    if case == "corrupt":
        save_sr_model(sr, TemporalSR(SR64), SR64)
        (sr / "model.safetensors").write_bytes(b"garbage")
    elif case == "wrong_size":
        save_sr_model(sr, TemporalSR(SR_PRESETS["tiny"]), SR_PRESETS["tiny"])
    flag = ["--sr"] if case == "not_bundled" else ["--sr", str(sr)]
    monkeypatch.setattr(upscale, "bundled_sr", lambda: tmp_path / "no_bundle")
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    capsys.readouterr()
    code = main(["animate", "-s", str(tmp_path / "face.png"), "-d", str(tmp_path / "face.png"), "-o", str(out),
                 "--checkpoint", str(tmp_path / "base"), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert list(out.parent.iterdir()) == []


def test_upscale_cli_writes_a_video(sr_folder, tmp_path):
    from skimage import data

    from metaportrait.data.face import CropBox, crop
    from metaportrait.io.video import VideoReader, write_video

    image = data.astronaut()
    frames = [crop(image, CropBox(225 + 3 * k, 125, 260), 160) for k in range(5)]
    source = tmp_path / "in.mp4"
    write_video(source, frames, 10)
    out = tmp_path / "up.mp4"
    assert main(["upscale", str(source), "-o", str(out), "--sr", str(sr_folder), "--chunk", "2"]) == 0
    with VideoReader(out) as reader:
        result = list(reader)
    assert len(result) == 5 and result[0].shape == (160, 160, 3)
    crops = tmp_path / "crops.mp4"
    assert main(["upscale", str(source), "-o", str(crops), "--sr", str(sr_folder), "--crop-output"]) == 0
    with VideoReader(crops) as reader:
        assert next(iter(reader)).shape == (128, 128, 3)
