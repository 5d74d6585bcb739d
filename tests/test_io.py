"""Image and video I/O: round trips, audio passthrough, frame-rate resampling, orientation, bad inputs."""

from __future__ import annotations

import gc
import itertools
import weakref
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from metaportrait.errors import InputError
from metaportrait.io.image import (
    frames_to_tensor,
    is_image_path,
    is_video_path,
    read_image,
    to_tensor,
    to_uint8,
    to_uint8_frames,
    write_image,
)
from metaportrait.io.video import (
    VideoReader,
    VideoWriter,
    even_size,
    probe,
    read_video,
    resample_fps,
    write_video,
)


def _frames(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Smooth, moving colour gradients (H.264 keeps them within a few grey levels)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(count):
        red = 40 + 150 * x / width
        green = 40 + 150 * y / height
        blue = np.full_like(x, 30 + 6 * i)
        frames.append(np.stack([red, green, blue], axis=-1).round().astype(np.uint8))
    return frames


def _make_av_file(path: Path, seconds: float, audio_codec: str, fps: int = 25, sample_rate: int = 16000) -> None:
    """A tiny file with a black video track and a 440 Hz sine audio track."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream(audio_codec, rate=sample_rate)
        audio.layout = "mono"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        sample_format = audio.codec_context.format.name
        for start in range(0, round(seconds * sample_rate), 1024):
            wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(start, start + 1024) / sample_rate)
            samples = wave.astype(np.float32)[None]
            if sample_format == "s16":
                samples = (samples * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(samples, format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def _stream_durations(path: Path) -> tuple[float, float, str]:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return (
            float(video.duration * video.time_base),
            float(audio.duration * audio.time_base),
            audio.codec_context.name,
        )


# --- images -------------------------------------------------------------------------------------------------


def test_image_round_trip_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", image)
    assert np.array_equal(read_image(tmp_path / "a.png"), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temporary file left behind


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer must rotate 90 degrees clockwise
    Image.fromarray(image).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "phone.jpg")
    assert upright.shape == (40, 20, 3)  # now portrait
    # Rotating clockwise moves the white left half to the top.
    assert upright[:15].mean() > 200 and upright[-15:].mean() < 50


def test_grayscale_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 100, np.uint8), mode="L").save(tmp_path / "gray.png")
    Image.fromarray(np.full((8, 8, 4), 50, np.uint8)).save(tmp_path / "rgba.png")
    gray, rgba = read_image(tmp_path / "gray.png"), read_image(tmp_path / "rgba.png")
    assert gray.shape == rgba.shape == (8, 8, 3) and gray.dtype == np.uint8
    assert (gray == 100).all() and (rgba == 50).all()


def test_bad_images_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(InputError, match="not an image"):
        read_image(tmp_path / "text.jpg")
    rng = np.random.default_rng(0)
    write_image(tmp_path / "full.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_tensor_conversions():
    image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(image)
    assert tensor.shape == (1, 3, 5, 7) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    assert tensor[0, 1, 2, 3].item() == pytest.approx(image[2, 3, 1] / 255.0)
    assert np.array_equal(to_uint8(tensor), image)
    assert np.array_equal(to_uint8(tensor[0]), image)
    frames = np.stack([image, image[::-1]])
    assert np.array_equal(to_uint8_frames(frames_to_tensor(frames)), frames)


def test_tensor_conversions_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(torch.full((1, 3, 4, 4), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="batch"):
        to_uint8(torch.zeros(2, 3, 4, 4))
    # Rounding noise just outside [0, 1] is accepted.
    assert to_uint8(torch.full((1, 3, 2, 2), 1.0 + 1e-5)).max() == 255


def test_path_kinds():
    assert is_image_path("a/b.JPG") and is_image_path("x.webp") and not is_image_path("x.mp4")
    assert is_video_path("v.MOV") and is_video_path("g.mpg") and not is_video_path("x.png")


# --- video --------------------------------------------------------------------------------------------------


def test_video_round_trip(tmp_path):
    frames = _frames(30)
    assert write_video(tmp_path / "clip.mp4", frames, fps=30) == 30
    decoded, fps = read_video(tmp_path / "clip.mp4")
    assert decoded.shape == (30, 48, 64, 3) and decoded.dtype == np.uint8
    assert fps == pytest.approx(30.0)
    difference = np.abs(decoded.astype(np.int16) - np.stack(frames).astype(np.int16))
    assert difference.mean() < 3.0
    info = probe(tmp_path / "clip.mp4")
    assert (info.width, info.height, info.frame_count, info.has_audio) == (64, 48, 30, False)
    assert info.duration == pytest.approx(1.0, abs=0.05)
    assert read_video(tmp_path / "clip.mp4", max_frames=4)[0].shape[0] == 4


def test_colours_survive_a_round_trip_without_a_shift(tmp_path):
    # A smooth gradient, nearly lossless (crf 0): what remains is the colour conversion both ways, which must not
    # darken or tint (swscale's default YUV -> RGB came out 1 grey level darker on average).
    rows, cols = np.mgrid[0:64, 0:96]
    frame = np.stack([40 + rows * 2, 60 + cols, 200 - rows * 2], axis=-1).astype(np.uint8)
    with VideoWriter(tmp_path / "gradient.mp4", fps=25, crf=0) as writer:
        for _ in range(3):
            writer.write(frame)
    decoded, _ = read_video(tmp_path / "gradient.mp4")
    shift = decoded.astype(np.float64).mean(axis=(0, 1, 2)) - frame.astype(np.float64).mean(axis=(0, 1))
    assert np.abs(shift).max() < 0.3, shift
    assert np.abs(decoded.astype(np.int16) - frame.astype(np.int16)).mean() < 0.8


def test_non_integer_fps_round_trip(tmp_path):
    write_video(tmp_path / "ntsc.mp4", _frames(10), fps=30000 / 1001)
    assert probe(tmp_path / "ntsc.mp4").fps == pytest.approx(29.97, abs=0.01)


def test_writer_requires_even_sizes(tmp_path):
    odd = np.zeros((33, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="even"):
        with VideoWriter(tmp_path / "odd.mp4", fps=25) as writer:
            writer.write(odd)
    assert even_size(odd).shape == (32, 64, 3)
    assert even_size(np.zeros((7, 9, 3), np.uint8)).shape == (6, 8, 3)
    assert list(tmp_path.iterdir()) == []


def test_failing_writer_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / "out.mp4", fps=25) as writer:
            for frame in _frames(5):
                writer.write(frame)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4", fps=25):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="differs"):
        with VideoWriter(tmp_path / "sizes.mp4", fps=25) as writer:
            writer.write(np.zeros((32, 32, 3), np.uint8))
            writer.write(np.zeros((32, 34, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("source_name", "codec"), [("sine.mp4", "aac"), ("sine.mov", "pcm_s16le")])
def test_audio_passthrough(tmp_path, source_name, codec):
    """AAC is copied as it is; PCM (not allowed in mp4) is re-encoded to AAC. Both are cut at the video's end."""
    source = tmp_path / source_name
    _make_av_file(source, seconds=2.0, audio_codec=codec)
    assert probe(source).audio_codec == codec
    write_video(tmp_path / "out.mp4", _frames(30), fps=30, audio_from=source)  # 1 s of video
    video_seconds, audio_seconds, out_codec = _stream_durations(tmp_path / "out.mp4")
    assert out_codec == "aac"
    assert video_seconds == pytest.approx(1.0, abs=0.01)
    assert audio_seconds == pytest.approx(video_seconds, abs=0.1)  # one AAC frame is 64 ms at 16 kHz
    assert probe(tmp_path / "out.mp4").has_audio


def test_audio_from_file_without_audio_fails(tmp_path):
    write_video(tmp_path / "silent.mp4", _frames(4), fps=25)
    with pytest.raises(InputError, match="no audio"):
        VideoWriter(tmp_path / "out.mp4", fps=25, audio_from=tmp_path / "silent.mp4")


@pytest.mark.parametrize(
    ("src_fps", "dst_fps", "count", "expected"),
    [(30, 25, 60, 50), (25, 30, 50, 60), (25, 25, 17, 17), (10, 25, 20, 50)],
)
def test_resample_fps_counts(src_fps, dst_fps, count, expected):
    output = list(resample_fps(iter(range(count)), src_fps, dst_fps))
    assert abs(len(output) - expected) <= 1
    assert output == sorted(output) and output[0] == 0  # order kept, starts at the first frame
    # Each output frame is the source frame nearest its time stamp.
    for k, index in enumerate(output):
        assert abs(index / src_fps - k / dst_fps) <= 0.5 / src_fps + 1e-9


def test_resample_fps_is_lazy():
    def endless():
        yield from itertools.count()

    assert list(itertools.islice(resample_fps(endless(), 30, 25), 5)) == [0, 1, 2, 4, 5]


def test_video_reader_streams(tmp_path):
    """Frames come one at a time: the reader holds no reference to frames it has already handed out."""
    write_video(tmp_path / "long.mp4", _frames(60, 96, 128), fps=25)
    with VideoReader(tmp_path / "long.mp4") as reader:
        assert (reader.width, reader.height, reader.frame_count, reader.fps) == (128, 96, 60, 25.0)
        handed_out = [weakref.ref(frame) for frame in reader]  # keep only weak references
        gc.collect()
        with pytest.raises(RuntimeError, match="only once"):
            next(iter(reader))
    assert len(handed_out) == 60
    # A reader that decoded everything into a list first would keep all 60 arrays alive.
    assert sum(ref() is not None for ref in handed_out) <= 2


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # the viewer turns the stored frame 90 degrees counter-clockwise
        image = np.zeros((32, 64, 3), np.uint8)
        image[:, :32] = 255
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames, _ = read_video(path)
    assert frames.shape == (3, 64, 32, 3)
    assert probe(path).rotation == 90 and (probe(path).width, probe(path).height) == (32, 64)
    # Counter-clockwise: the white left half ends up at the bottom.
    assert frames[0, -20:].mean() > 200 and frames[0, :20].mean() < 50


def test_bad_videos_raise_input_error(tmp_path, shared_data):
    with pytest.raises(InputError, match="not found"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(InputError, match="text.mp4"):
        VideoReader(tmp_path / "text.mp4")
    # First half of a real file: its index (moov) is at the end, so it cannot even be opened.
    data = (shared_data / "driving" / "lp_d1.mp4").read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="half.mp4"):
        read_video(tmp_path / "half.mp4")
    # Index at the front (faststart): opens, then stops early while iterating.
    with av.open(str(tmp_path / "fast.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = (tmp_path / "fast.mp4").read_bytes()
    (tmp_path / "fast_half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_video(tmp_path / "fast_half.mp4")
    # A still image is not a video.
    write_image(tmp_path / "still.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="still image"):
        VideoReader(tmp_path / "still.png")


def test_audio_only_file_is_not_a_video(tmp_path):
    with av.open(str(tmp_path / "voice.m4a"), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="no video stream"):
        probe(tmp_path / "voice.m4a")
