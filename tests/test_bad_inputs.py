"""The bad-input matrix (issue 24): odd files, odd content and bad options fed to `animate` and `landmarks`.

Every case either works (the odd but valid inputs: grayscale, RGBA and 16-bit PNGs, variable frame rate,
rotated phone video, non-ASCII paths, several faces, a face cut by the border, a lost face, an upside-down
head) or fails with exactly one stderr line ``error: <file or command>: <problem>``, a non-zero exit and
nothing written to the output folder. Inputs are tiny files made here; the model is a random ``tiny`` one.
The fuzz test at the end feeds damaged copies of a real mp4 and jpg to both commands (a small run here,
a few hundred cases with ``-m slow``).
"""

from __future__ import annotations

import faulthandler
import shutil
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from metaportrait.cli import main
from metaportrait.config import PRESETS
from metaportrait.data.face import CropBox, crop
from metaportrait.data.landmarks import landmarks_of_image
from metaportrait.errors import InputError
from metaportrait.io.checkpoint import save_model
from metaportrait.io.image import write_image
from metaportrait.io.video import VideoReader, write_video
from metaportrait.models.generator import Generator

SECONDS_PER_CASE = 60  # a case that takes longer has hung (the slowest real case takes a few seconds)


# --- input files ---------------------------------------------------------------------------------------------


def _face_clip(image: np.ndarray, count: int, size: int = 128) -> list[np.ndarray]:
    """The astronaut's face drifting inside a square crop: a tiny driving clip."""
    return [crop(image, CropBox(225 + 8 * np.sin(k), 125 + 4 * np.cos(k), 260), size) for k in range(count)]


def _write_vfr(path: Path, frames: list[np.ndarray]) -> None:
    """An H.264 mp4 whose frames are 40, 80, 40, 120, ... ms apart (variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        time = 0
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            container.mux(stream.encode(frame))
            time += (40, 80, 40, 120)[index % 4]
        container.mux(stream.encode(None))


def _write_rotated(path: Path, frames: list[np.ndarray]) -> None:
    """A phone-style mp4: frames stored turned 90 degrees clockwise, with a display matrix turning them back."""
    stored = [np.ascontiguousarray(np.rot90(f, k=-1)) for f in frames]  # what a phone held upright stores
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = stored[0].shape[1], stored[0].shape[0], "yuv420p"
        stream.set_display_rotation(90)  # the viewer turns them 90 degrees counter-clockwise
        for index, image in enumerate(stored):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Every input file of the matrix, made once, plus a tiny checkpoint and checkpoints that are wrong."""
    from skimage import data

    folder = tmp_path_factory.mktemp("media")
    astronaut = data.astronaut()  # uint8 (512, 512, 3)
    portrait = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    # MediaPipe's first import prints a protobuf warning through sys.stderr, which the CLI hides in a real process
    # (file descriptor 2) but pytest's capture would see; import it here, outside any case.
    landmarks_of_image(portrait, "portrait")
    face = crop(astronaut, CropBox(225, 125, 260), 256)
    files = {"portrait": folder / "portrait.png", "driving": folder / "driving.mp4", "jpg": folder / "portrait.jpg"}
    write_image(files["portrait"], portrait)
    write_image(files["jpg"], portrait, quality=90)
    clip = _face_clip(astronaut, 4)
    write_video(files["driving"], clip, fps=10)

    def add(name: str) -> Path:
        files[name.split(".")[0]] = folder / name
        return folder / name

    add("empty.jpg").write_bytes(b"")
    add("text.jpg").write_text("this is not an image\n")
    data_bytes = files["driving"].read_bytes()
    add("truncated.mp4").write_bytes(data_bytes[: len(data_bytes) // 2])
    Image.new("RGB", (8000, 8000), (120, 110, 100)).save(add("huge.png"), compress_level=1)
    write_image(add("pixel.png"), np.full((1, 1, 3), 128, np.uint8))
    Image.fromarray(portrait.mean(-1).astype(np.uint8)).save(add("gray.png"))
    Image.fromarray(np.dstack([portrait, np.full(portrait.shape[:2], 180, np.uint8)])).save(add("rgba.png"))
    Image.fromarray((portrait.mean(-1) * 257).astype(np.uint16)).save(add("gray16.png"))
    cv2.imwrite(str(add("rgb16.png")), portrait[..., ::-1].astype(np.uint16) * 257)
    _write_audio_only(add("audio_only.mp4"))
    _write_vfr(add("vfr.mp4"), clip)
    _write_rotated(add("rotated.mp4"), clip)
    odd = folder / "dossier été" / "mon portrait ü.png"
    odd.parent.mkdir()
    shutil.copy(files["portrait"], odd)
    files["odd_path"] = odd
    # Content.
    write_image(add("faceless.png"), np.full((96, 96, 3), 128, np.uint8))
    write_video(add("faceless_video.mp4"), [np.full((64, 64, 3), 90, np.uint8)] * 3, fps=10)
    two = np.full((384, 512, 3), 200, np.uint8)  # a small face on the left, a larger one on the right
    two[128:320, 20:212] = cv2.resize(face, (192, 192), interpolation=cv2.INTER_AREA)
    two[64:320, 256:512] = face
    write_image(add("two_faces.png"), two)
    write_image(add("cut_by_border.png"), np.ascontiguousarray(astronaut[:, 215:]))  # a third of the face is off
    write_video(add("face_lost.mp4"), clip[:2] + [np.full_like(clip[0], 90)] * 2 + clip[2:], fps=10)
    write_image(add("upside_down.png"), np.ascontiguousarray(portrait[::-1, ::-1]))
    # Checkpoints: a good tiny one, one whose weights belong to another preset, one truncated.
    torch.manual_seed(0)
    tiny, lite = PRESETS["tiny"], PRESETS["lite"]
    files["checkpoint"] = save_model(folder / "tiny_model", Generator(tiny), tiny)
    other = folder / "other_preset"
    shutil.copytree(files["checkpoint"], other)
    save_model(folder / "lite_model", Generator(lite), lite)
    shutil.copy(folder / "lite_model" / "config.json", other / "config.json")  # lite config, tiny weights
    files["other_preset"] = other
    corrupted = folder / "corrupted_model"
    shutil.copytree(files["checkpoint"], corrupted)
    weights = (corrupted / "model.safetensors").read_bytes()
    (corrupted / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    files["corrupted_model"] = corrupted
    return files


# --- running a command ---------------------------------------------------------------------------------------


class _Hung(Exception):
    pass


def _alarm(signum, frame):
    raise _Hung()


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run ``metaportrait argv`` in this process under a time limit; (exit status, stderr lines)."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    # The alarm interrupts Python code; a hang inside native code (a decoder) is ended by faulthandler's watchdog
    # thread, which prints every thread's stack and exits the test process: a loud failure, not a silent hang.
    faulthandler.dump_traceback_later(2 * SECONDS_PER_CASE, exit=True, file=sys.__stderr__)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse exits on a bad option
        code = exit_.code
    except _Hung:
        pytest.fail(f"hung for more than {SECONDS_PER_CASE} s: {argv}")
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code: int, err: list[str], out_dir: Path, *expected: str) -> None:
    """A clean failure: non-zero exit, one line ``error: ...`` holding every ``expected`` text, nothing written."""
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], (text, err[0])
    assert list(out_dir.iterdir()) == [], "partial output left behind"


def _animate(media, source="portrait", driving="driving", checkpoint="checkpoint", extra=()):
    return lambda out: ["animate", "-s", media[source], "-d", media[driving], "-o", out / "out.mp4",
                        "--checkpoint", media[checkpoint], *extra]  # fmt: skip


def _landmarks(media, name, extra=()):
    return lambda out: ["landmarks", media[name], "-o", out / "points.npz", *extra]


# --- failures: one line, non-zero exit, nothing written ------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    command: str  # "animate-source", "animate-driving", "landmarks", "checkpoint" or "argv"
    input: str  # key into `media`, or the option words for "argv"
    expected: tuple[str, ...]  # texts the error line must hold (the file name and the problem)


BAD = {
    # Files.
    "missing source": Bad("animate-source", "nowhere", ("nowhere.png", "file not found")),
    "missing input (landmarks)": Bad("landmarks", "nowhere", ("nowhere.png", "file not found")),
    "empty jpg": Bad("animate-source", "empty", ("empty.jpg", "not an image file")),
    "empty jpg (landmarks)": Bad("landmarks", "empty", ("empty.jpg", "not an image file")),
    "truncated mp4": Bad("animate-driving", "truncated", ("truncated.mp4", "not a readable video")),
    "truncated mp4 (landmarks)": Bad("landmarks", "truncated", ("truncated.mp4", "not a readable video")),
    "text named .jpg": Bad("animate-source", "text", ("text.jpg", "not an image file")),
    "text named .jpg (landmarks)": Bad("landmarks", "text", ("text.jpg", "not an image file")),
    "8000x8000 image": Bad("animate-source", "huge", ("huge.png", "8000x8000", "limit of 50 megapixels")),
    "8000x8000 image (landmarks)": Bad("landmarks", "huge", ("huge.png", "limit of 50 megapixels")),
    "1x1 image": Bad("animate-source", "pixel", ("pixel.png", "no face found")),
    "audio-only mp4": Bad("animate-driving", "audio_only", ("audio_only.mp4", "no video stream")),
    "audio-only mp4 (landmarks)": Bad("landmarks", "audio_only", ("audio_only.mp4", "no video stream")),
    "image as driving video": Bad("animate-driving", "portrait", ("portrait.png", "still image")),
    # Content.
    "no face in the portrait": Bad("animate-source", "faceless", ("faceless.png", "no face found")),
    "no face in the video": Bad("animate-driving", "faceless_video", ("faceless_video.mp4", "no face found")),
    "no face (landmarks)": Bad("landmarks", "faceless", ("faceless.png", "no face found")),
    # Options.
    "expression scale out of range": Bad("argv", "--expression-scale 9", ("animate", "9 is outside [0, 3]")),
    "zero batch": Bad("argv", "--batch-size 0", ("animate", "--batch-size", "at least 1")),
    "negative fps": Bad("argv", "--fps -5", ("animate", "--fps")),
    "yaw out of range": Bad("argv", "--yaw 400", ("animate", "--yaw", "outside")),
    "unknown motion": Bad("argv", "--motion sideways", ("animate", "invalid choice: 'sideways'")),
    "reference beyond the clip": Bad("argv", "--reference 99", ("driving.mp4", "outside the driving clip")),
    "checkpoint of another preset": Bad("checkpoint", "other_preset", ("model.safetensors", "another preset")),
    "corrupted checkpoint": Bad("checkpoint", "corrupted_model", ("model.safetensors", "cannot read the weights")),
    "missing checkpoint": Bad("checkpoint", "nowhere", ("nowhere", "not found")),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(case, media, tmp_path, capsys):
    bad = BAD[case]
    media = {**media, "nowhere": tmp_path / "nowhere.png"}
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "animate-source": _animate(media, source=bad.input),
        "animate-driving": _animate(media, driving=bad.input),
        "landmarks": _landmarks(media, bad.input),
        "checkpoint": _animate(media, checkpoint=bad.input),
        "argv": _animate(media, extra=bad.input.split()),
    }[bad.command](out)
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, out, *bad.expected)


@pytest.mark.parametrize("name", ["text", "huge", "faceless", "truncated"])
@pytest.mark.parametrize("command", ["edit", "identity"])
def test_other_commands_refuse_bad_images_in_one_line(command, name, media, tmp_path, capsys):
    if command == "edit":
        argv = ["edit", "-s", media[name], "-o", tmp_path / "edited.png", "--checkpoint", media["checkpoint"]]
    else:
        argv = ["identity", media["portrait"], media[name]]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, tmp_path, media[name].name)


def test_unknown_preset_is_one_line(tmp_path, capsys):
    code, err = run_cli(["train", "base", "--stage", "warp", "--data", tmp_path, "--out", tmp_path / "run",
                         "--preset", "huge"], capsys)  # fmt: skip
    assert_one_line_error(code, err, tmp_path, "invalid choice: 'huge'", "lite")


def test_debug_shows_the_traceback(media, tmp_path, capsys):
    with pytest.raises(InputError, match="not an image file"):
        main(["--debug", "landmarks", str(media["text"]), "-o", str(tmp_path / "p.npz")])
    with pytest.raises(InputError, match="not an image file"):  # also after the subcommand's options
        main(["landmarks", str(media["text"]), "-o", str(tmp_path / "p.npz"), "--debug"])
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_is_one_line_without_debug(media, tmp_path, capsys, monkeypatch):
    from metaportrait.cli import landmarks

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug deep inside\nwith a second line")

    monkeypatch.setattr(landmarks, "landmarks_of_image", broken)
    code, err = run_cli(["landmarks", media["portrait"], "-o", tmp_path / "p.npz"], capsys)
    assert code == 1 and err == ["error: ZeroDivisionError: a bug deep inside (run with --debug for the traceback)"]
    assert list(tmp_path.iterdir()) == []


# --- odd but valid inputs: they work -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gray", "rgba", "gray16", "rgb16", "jpg", "odd_path"])
def test_odd_images_give_landmarks_on_the_face(name, media, tmp_path, capsys):
    out = tmp_path / "sortie à l'été"
    out.mkdir()
    code, err = run_cli(_landmarks(media, name)(out), capsys)
    assert code == 0, err
    points = np.load(out / "points.npz")["landmarks"][0]
    assert np.abs(points[:468].mean(axis=0) - (112, 70)).max() < 20  # the face's centre in the 256 px portrait


def test_several_faces_use_the_largest_and_say_so(media, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    code, err = run_cli(_landmarks(media, "two_faces")(tmp_path), capsys)
    assert code == 0, err
    centre = np.load(tmp_path / "points.npz")["landmarks"][0, :468].mean(axis=0)
    assert centre[0] > 256  # the larger face, on the right
    assert "2 faces found; using the largest" in caplog.text


@pytest.mark.parametrize(
    "case",
    ["vfr", "rotated", "odd_path", "face_lost", "cut_by_border", "upside_down"],
)
def test_odd_inputs_animate(case, media, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    source, driving = "portrait", "driving"
    if case in ("vfr", "rotated", "face_lost"):
        driving = case
    else:
        source = case
    out = tmp_path / "résultat 1"
    out.mkdir()
    code, err = run_cli(_animate(media, source, driving)(out), capsys)
    assert code == 0, err
    with VideoReader(out / "out.mp4") as reader:
        frames = list(reader)
    with VideoReader(media[driving]) as reader:
        assert len(frames) == sum(1 for _ in reader)
    assert [p.name for p in out.iterdir()] == ["out.mp4"]
    if case == "face_lost":
        assert "2 frames with lost face tracking" in caplog.text


def test_rotated_video_is_upright_in_landmarks(media, tmp_path, capsys):
    code, err = run_cli(_landmarks(media, "rotated")(tmp_path), capsys)
    assert code == 0, err
    result = np.load(tmp_path / "points.npz")
    assert result["image_size"].tolist() == [128, 128] and result["present"].all()
    eyes, chin = result["landmarks"][0, [33, 263]], result["landmarks"][0, 152]
    assert chin[1] > eyes[:, 1].max()  # upright: the chin below the eyes


# --- fuzzing: damaged copies of a real mp4 and jpg -----------------------------------------------------------


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """A truncation, a few flipped bytes, or both."""
    data = bytearray(data)
    kind = rng.integers(3)
    if kind in (0, 2):
        data = data[: int(rng.integers(0, len(data)))]
    if kind in (1, 2) and data:
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[position] ^= int(rng.integers(1, 256))
    return bytes(data)


def _fuzz(media, tmp_path, capsys, cases: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    outcomes = {"ok": 0, "error": 0}
    originals = {"mp4": media["driving"].read_bytes(), "jpg": media["jpg"].read_bytes()}
    for index in range(cases):
        suffix = ("mp4", "jpg")[index % 2]
        damaged = tmp_path / f"damaged_{index}.{suffix}"
        damaged.write_bytes(_damaged(originals[suffix], rng))
        out = tmp_path / f"out_{index}"
        out.mkdir()
        files = {**media, "damaged": damaged}
        command = ("landmarks", "animate")[(index // 2) % 2]
        argv = (_landmarks(files, "damaged") if command == "landmarks" else
                _animate(files, **({"driving": "damaged"} if suffix == "mp4" else {"source": "damaged"})))(out)
        code, err = run_cli(argv, capsys)
        if code == 0:
            outcomes["ok"] += 1
            assert len(list(out.iterdir())) == 1  # the one complete output, no temporary file
        else:
            outcomes["error"] += 1
            assert code == 2, (argv, err)  # a bad input, never an internal error
            assert_one_line_error(code, err, out, str(damaged))
        damaged.unlink()
    return outcomes


def test_fuzz_damaged_files_small(media, tmp_path, capsys):
    outcomes = _fuzz(media, tmp_path, capsys, cases=24, seed=0)
    assert outcomes["error"] > 0


@pytest.mark.slow
def test_fuzz_damaged_files_many(media, tmp_path, capsys):
    outcomes = _fuzz(media, tmp_path, capsys, cases=300, seed=1)
    print(outcomes)
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
