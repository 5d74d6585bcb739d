"""Faults survived (issue 24): training killed with SIGKILL and resumed, `prepare` interrupted and rerun, a full
disk or an unwritable folder, and loading files that would run code.

- `train base` (tiny preset, a checkpoint every step) is killed at random moments in a subprocess and resumed:
  the run ends on the same loss curve and weights as one that was never stopped, and every checkpoint on disk
  at the moment of a kill loads whole (one kill here; several with ``-m slow``).
- `prepare` interrupted in the middle of a clip, or while appending a manifest line, finishes on the rerun
  without redoing the finished clip or keeping the half-written one.
- A write failing with ``ENOSPC`` (the disk is full, simulated) or ``EACCES`` (an unwritable folder): one error
  line, and nothing half-written left behind.
- Safe loading: every ``torch.load`` in the package passes ``weights_only=True``, and a pickle that would run
  code is refused by each loader without running anything.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import metaportrait
from metaportrait.cli import main
from metaportrait.errors import InputError

# The tiny synthetic prepared dataset of the training tests (3 clips of the astronaut, two identities).
from test_train import astronaut_face, dataset_dir  # noqa: F401 - pytest fixtures

SRC = Path(metaportrait.__file__).resolve().parents[1]
TIMING_KEYS = {"s_per_step"}  # log fields that measure time, not the run


def _train_argv(data: Path, out: Path, resume: bool) -> list[str]:
    if resume:  # a resumed run takes its settings from RUN_DIR/train_config.json
        return ["train", "base", "--stage", "full", "--data", str(data), "--out", str(out), "--resume"]
    return ["train", "base", "--stage", "full", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--steps", "6", "--val-identities", "blue", "--threads", "1", "--checkpoint-every", "1",
            "--log-every", "1", "--sample-every", "2", "--val-every", "3"]  # fmt: skip


def _start_training(data: Path, out: Path) -> subprocess.Popen:
    resume = (out / "train_config.json").exists()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from metaportrait.cli import main; sys.exit(main(sys.argv[1:]))",
               *_train_argv(data, out, resume)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_at_random(process: subprocess.Popen, ready, delay: float, limit: float = 240) -> bool:
    """SIGKILL ``process`` ``delay`` seconds after ``ready()`` becomes true; False if it finished first."""
    deadline = time.monotonic() + limit
    while not ready() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the process did not get going")
        time.sleep(0.02)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _logged_steps(out: Path) -> int:
    path = out / "log.jsonl"
    return path.read_text().count("\n") if path.exists() else -1  # -1: the loop has not started


def _assert_whole_checkpoint(out: Path) -> int:
    """The checkpoint on disk (if any) loads whole; returns its step (0 without one)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {"generator", "optimizer_generator", "discriminator", "rng", "step"} <= set(state)
    return int(state["step"])


def _curve(out: Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


@pytest.fixture(scope="module")
def straight_run(dataset_dir, tmp_path_factory) -> Path:  # noqa: F811 - the imported fixture
    """The same run, never interrupted (in this process)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(_train_argv(dataset_dir, out, resume=False)) == 0
    return out


def _kill_and_resume(dataset_dir, straight_run, out: Path, kills: int, seed: int) -> int:  # noqa: F811
    """Start, kill at a random moment and restart the run up to ``kills`` times, then finish it and compare it with
    ``straight_run``; returns how many times it was killed (a run may end before its kill)."""
    rng = random.Random(seed)
    done = killed = 0
    while killed < kills:
        process = _start_training(dataset_dir, out)
        # Any moment from the start of the loop on (log.jsonl appears then), also before the first checkpoint.
        if not _kill_at_random(process, lambda: _logged_steps(out) >= 0, delay=rng.uniform(0.0, 6.0)):
            assert process.returncode == 0
            done = 1
            break
        killed += 1
        _assert_whole_checkpoint(out)
    if not done:  # the last run goes to the end
        assert main(_train_argv(dataset_dir, out, resume=(out / "train_config.json").exists())) == 0
    assert _assert_whole_checkpoint(out) == 6
    assert _curve(out) == _curve(straight_run)
    straight = torch.load(straight_run / "checkpoint.pt", weights_only=True)["generator"]
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["generator"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not list(out.rglob("*.tmp")), "temporary files of the killed runs were left behind"
    return killed


def test_training_killed_once_resumes_on_the_same_curve(dataset_dir, straight_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    process = _start_training(dataset_dir, out)
    # Killed at a random moment within a random step after the first (so the resume continues a checkpoint), early
    # enough that it cannot finish first even on a fast machine.
    rng = random.Random(0)
    after = rng.randint(2, 4)  # the log line of step 2 comes after the checkpoint of step 1
    assert _kill_at_random(process, lambda: _logged_steps(out) >= after, delay=rng.uniform(0.0, 0.2))
    step = _assert_whole_checkpoint(out)
    assert 1 <= step < 6
    _kill_and_resume(dataset_dir, straight_run, out, kills=0, seed=0)


@pytest.mark.slow
def test_training_killed_many_times_resumes_on_the_same_curve(dataset_dir, straight_run, tmp_path):  # noqa: F811
    assert _kill_and_resume(dataset_dir, straight_run, tmp_path / "run", kills=4, seed=1) >= 2


def test_training_killed_before_its_first_checkpoint_starts_again(dataset_dir, straight_run, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text((straight_run / "train_config.json").read_text())
    (out / "log.jsonl").write_text('{"step": 1, "total_g": 1.0}\n{"step": 2, "tot')  # cut off by the kill
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert main(_train_argv(dataset_dir, out, resume=True)) == 0
    assert _curve(out) == _curve(straight_run)
    assert not list(out.rglob("*.tmp"))


def test_damaged_training_checkpoint_is_one_error_line(dataset_dir, straight_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    for name in ("train_config.json", "log.jsonl"):
        (out / name).write_text((straight_run / name).read_text())
    data = (straight_run / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(_train_argv(dataset_dir, out, resume=True)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "checkpoint.pt: cannot read the training state" in errors[0]


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(dataset_dir, straight_run, tmp_path,  # noqa: F811
                                                                  monkeypatch, capsys):  # fmt: skip
    from metaportrait.train import base

    real_save, calls = torch.save, []

    def save_until_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as handle:  # half written, then the disk is full
                handle.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(base.torch, "save", save_until_full)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_train_argv(dataset_dir, out, resume=False)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {out / 'checkpoint.pt'}: No space left on device"]  # after the progress bar's lines
    assert _assert_whole_checkpoint(out) == 2  # the step-2 checkpoint, whole
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(base.torch, "save", real_save)  # space freed: the run continues
    assert main(_train_argv(dataset_dir, out, resume=True)) == 0
    assert _curve(out) == _curve(straight_run)


# --- prepare -------------------------------------------------------------------------------------------------


def _prepare_input(root: Path) -> Path:
    from test_prepare import _astronaut_clip

    from metaportrait.io.video import write_video

    for person in ("anna", "bert"):
        (root / person).mkdir(parents=True)
        write_video(root / person / "talk.mp4", _astronaut_clip(8), fps=25)
    return root


def test_prepare_interrupted_mid_clip_finishes_without_redoing(tmp_path, monkeypatch):
    from metaportrait.data import prepare
    from metaportrait.data.prepare import PrepareConfig, prepare_dataset

    input_dir, output_dir = _prepare_input(tmp_path / "input"), tmp_path / "dataset"
    real_crop, crops = prepare.crop, []

    def crop_then_interrupt(*args, **kwargs):
        crops.append(1)
        if len(crops) == 8 + 4:  # the first clip's 8 frames, then half of the second's
            raise KeyboardInterrupt
        return real_crop(*args, **kwargs)

    monkeypatch.setattr(prepare, "crop", crop_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(input_dir, output_dir, PrepareConfig(size=32))
    assert [p.name for p in (output_dir / "clips").iterdir()] == ["anna__talk"]  # no half clip
    finished = (output_dir / "clips" / "anna__talk" / "frames.npy").stat().st_mtime_ns

    monkeypatch.setattr(prepare, "crop", real_crop)
    real_prepare_clip, redone = prepare.prepare_clip, []
    monkeypatch.setattr(prepare, "prepare_clip", lambda job, *a: redone.append(job.clip) or real_prepare_clip(job, *a))
    summary = prepare_dataset(input_dir, output_dir, PrepareConfig(size=32))
    assert redone == ["bert__talk"] and (summary.prepared, summary.already_done) == (1, 1)
    assert sorted(p.name for p in (output_dir / "clips").iterdir()) == ["anna__talk", "bert__talk"]
    assert (output_dir / "clips" / "anna__talk" / "frames.npy").stat().st_mtime_ns == finished


def test_prepare_interrupted_while_appending_a_manifest_line(tmp_path, caplog):
    from metaportrait.data.dataset import PreparedDataset
    from metaportrait.data.prepare import PrepareConfig, prepare_dataset

    input_dir, output_dir = _prepare_input(tmp_path / "input"), tmp_path / "dataset"
    prepare_dataset(input_dir, output_dir, PrepareConfig(size=32))
    manifest = output_dir / "manifest.jsonl"
    first, second = manifest.read_text().splitlines()
    manifest.write_text(first + "\n" + second[: len(second) // 2])  # the kill came in the middle of the line
    summary = prepare_dataset(input_dir, output_dir, PrepareConfig(size=32))
    assert (summary.prepared, summary.already_done) == (1, 1)
    assert "incomplete last line" in caplog.text
    assert len(PreparedDataset(output_dir).clips) == 2


@pytest.mark.slow
def test_prepare_killed_at_random_moments_finishes_the_same(tmp_path):
    from metaportrait.data.dataset import PreparedDataset
    from metaportrait.data.prepare import PrepareConfig, prepare_dataset

    input_dir = _prepare_input(tmp_path / "input")
    prepare_dataset(input_dir, tmp_path / "straight", PrepareConfig(size=32))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from metaportrait.cli import main; sys.exit(main(sys.argv[1:]))",
               "prepare", str(input_dir), "--output", str(out), "--size", "32"]  # fmt: skip
    rng = random.Random(2)
    for _ in range(3):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _kill_at_random(process, (out / "prepare.json").exists, delay=rng.uniform(0.0, 4.0)):
            break
        assert not any(p.name.startswith(".tmp-") and p.is_file() for p in (out / "clips").iterdir())
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    assert not [p.name for p in (out / "clips").iterdir() if p.name.startswith(".")]
    straight, killed = PreparedDataset(tmp_path / "straight"), PreparedDataset(out)
    names = ["anna__talk", "bert__talk"]
    assert sorted(c.clip for c in killed.clips) == sorted(c.clip for c in straight.clips) == names
    by_name = {clip.clip: clip for clip in killed.clips}
    for clip in straight.clips:
        np.testing.assert_array_equal(by_name[clip.clip].frames, clip.frames)


# --- full disk, unwritable folder ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def portrait(tmp_path_factory) -> Path:
    from skimage import data

    from metaportrait.io.image import write_image

    from metaportrait.data.landmarks import landmarks_of_image

    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    write_image(path, data.astronaut()[::2, ::2].copy())
    # MediaPipe's first import prints a protobuf warning through sys.stderr (hidden from a real terminal, seen by
    # pytest's capture): import it here, outside the tests' captured output.
    landmarks_of_image(data.astronaut(), "astronaut")
    return path


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_landmarks_leaves_nothing(portrait, tmp_path, monkeypatch, capsys):
    from metaportrait.cli import landmarks

    def savez_until_full(handle, **arrays):
        handle.write(b"PK\x03\x04 half an npz")
        _no_space()

    monkeypatch.setattr(landmarks.np, "savez", savez_until_full)
    capsys.readouterr()
    assert main(["landmarks", str(portrait), "-o", str(tmp_path / "points.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'points.npz'}: No space left on device"]
    assert list(tmp_path.iterdir()) == []


def test_full_disk_animate_leaves_nothing(portrait, tmp_path, monkeypatch, capsys):
    from test_bad_inputs import _face_clip

    from metaportrait.config import PRESETS
    from metaportrait.io import video
    from metaportrait.io.checkpoint import save_model
    from metaportrait.models.generator import Generator

    model = save_model(tmp_path / "model", Generator(PRESETS["tiny"]), PRESETS["tiny"])
    from skimage import data

    video.write_video(tmp_path / "driving.mp4", _face_clip(data.astronaut(), 3), fps=10)
    out = tmp_path / "out"
    out.mkdir()
    real_write, frames = video.VideoWriter.write, []

    def write_until_full(self, frame):
        frames.append(1)
        if len(frames) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        real_write(self, frame)

    monkeypatch.setattr(video.VideoWriter, "write", write_until_full)
    capsys.readouterr()
    code = main(["animate", "-s", str(portrait), "-d", str(tmp_path / "driving.mp4"), "-o", str(out / "out.mp4"),
                 "--checkpoint", str(model)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"error: {out / 'out.mp4'}: No space left on device"]
    assert list(out.iterdir()) == []


def test_unwritable_output_folder(portrait, tmp_path, monkeypatch, capsys):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(kwargs.get("dir", "")))

    # Simulated: the tests may run as root, who may write anywhere.
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    capsys.readouterr()
    assert main(["landmarks", str(portrait), "-o", str(tmp_path / "points.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: Permission denied"]
    assert list(tmp_path.iterdir()) == []
    # The folder's permissions say so up front: refused before any work.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["landmarks", str(portrait), "-o", str(tmp_path / "points.npz")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'points.npz'}: output folder {str(tmp_path)!r} is not writable"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder(portrait, tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        capsys.readouterr()
        assert main(["landmarks", str(portrait), "-o", str(folder / "points.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {folder / 'points.npz'}: output folder {str(folder)!r} is not writable"]
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --- safe loading --------------------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only():
    calls = []
    for path in sorted(SRC.joinpath("metaportrait").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:  # the call's text up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.name, text[match.start():end]))
        assert "allow_pickle=True" not in text and "pickle.load" not in text, path
    assert len(calls) >= 5
    unsafe = [call for call in calls if "weights_only=True" not in call[1]]
    assert unsafe == []


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, zip_format, dataset_dir,  # noqa: F811
                                                            straight_run):  # fmt: skip
    from metaportrait.eval.features import STLPIPS
    from metaportrait.eval.reference_nets import load_weight_file
    from metaportrait.io.convert_official import load_official_checkpoint
    from metaportrait.models.backbones import _load_state_dict
    from metaportrait.train.base import train_base
    from metaportrait.train.config import TrainConfig

    marker = tmp_path / "code_ran"
    evil = tmp_path / "ckpt_base.pth.tar"
    payload = {"generator": {"weight": _RunsCode(marker)}, "epoch": 1}
    torch.save(payload, evil, _use_new_zipfile_serialization=zip_format)
    # The same file unpickled without the guard would run the code: the test file really is dangerous.
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    loaders = {
        "official checkpoint": lambda: load_official_checkpoint(evil),
        "backbone weights": lambda: _load_state_dict(evil, "VGG19"),
        "reference-net weights": lambda: load_weight_file(evil, "alex.pth"),
        "shift-tolerant LPIPS weights": lambda: STLPIPS("alex", evil),
    }
    for name, load in loaders.items():
        with pytest.raises(InputError, match="ckpt_base.pth.tar"):
            load()
        assert not marker.exists(), f"{name} ran the pickle's code"
    # A training checkpoint replaced by the file: --resume refuses it.
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text((straight_run / "train_config.json").read_text())
    (run / "checkpoint.pt").write_bytes(evil.read_bytes())
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    with pytest.raises(InputError, match="checkpoint.pt: cannot read the training state"):
        train_base(cfg, dataset_dir, run, resume=True, progress=False)
    assert not marker.exists()
