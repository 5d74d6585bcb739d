"""Faults in meta-training, super-resolution training and personalisation: killed with SIGKILL, then resumed or rerun.

`train meta` and `train sr` killed at a random moment continue from their last checkpoint to the weights of a run
never interrupted; `personalize` killed while fine-tuning leaves no output folder (never a half-written checkpoint),
and a rerun finishes and leaves no temporary folder. The subprocess helpers are those of `test_faults.py`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from metaportrait.cli import main
from metaportrait.io.checkpoint import load_model, load_sr_model
from test_faults import SRC, _kill_at_random
from test_meta import tiny_init  # noqa: F401 - pytest fixture
from test_personalize import tiny_checkpoint, videos  # noqa: F401 - pytest fixtures
from test_train import astronaut_face, dataset_dir  # noqa: F401 - pytest fixtures
from test_train_sr import sr_dataset  # noqa: F401 - pytest fixture


def _subprocess(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from metaportrait.cli import main; sys.exit(main(sys.argv[1:]))",
               *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _meta_argv(init: Path, data: Path, out: Path) -> list[str]:
    return ["train", "meta", "--init", str(init), "--data", str(data), "--out", str(out), "--part", "refine",
            "--steps", "4", "--inner-steps", "2", "--tasks-per-step", "2", "--batch-size", "1",
            "--val-identities", "blue", "--val-every", "2", "--checkpoint-every", "1", "--threads", "1"]


def _logged(out: Path) -> int:
    path = out / "log.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_train_meta_killed_then_resumed_ends_with_the_straight_runs_weights(dataset_dir, tiny_init, tmp_path):  # noqa: F811
    assert main(_meta_argv(tiny_init, dataset_dir, tmp_path / "straight")) == 0
    out = tmp_path / "killed"
    process = _subprocess(_meta_argv(tiny_init, dataset_dir, out))
    # Killed at a random moment after its first outer step was logged (and checkpointed).
    assert _kill_at_random(process, lambda: _logged(out) >= 1, delay=random.Random(0).uniform(0.0, 0.5))
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # whole, never half-written
    assert 1 <= int(state["step"]) < 4
    # A resumed run takes its settings from the run folder.
    assert main(["train", "meta", "--init", str(tiny_init), "--data", str(dataset_dir), "--out", str(out),
                 "--resume"]) == 0
    straight, _ = load_model(tmp_path / "straight" / "model")
    resumed, _ = load_model(out / "model")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob("*.tmp")), "temporary files of the killed run were left behind"


def test_personalize_killed_while_fine_tuning_leaves_no_checkpoint(videos, tiny_checkpoint, tmp_path):  # noqa: F811
    out, cache = tmp_path / "me", tmp_path / "cache"
    argv = ["personalize", str(videos["astronaut"]), "--output", str(out), "--checkpoint", str(tiny_checkpoint),
            "--steps", "400", "--holdout-seconds", "1", "--threads", "1", "--cache", str(cache),
            "--batch-size", "1", "--part", "refine"]
    process = _subprocess(argv)
    # The front-end cache is written before fine-tuning starts: kill a little after it appears.
    assert _kill_at_random(process, lambda: cache.exists() and any(cache.rglob("*")), delay=3.0, limit=300)
    assert not out.exists(), "a killed personalize left an output folder"
    rerun = [*argv[:argv.index("--steps") + 1], "3", *argv[argv.index("--steps") + 2:]]
    assert main(rerun) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "report.json", "report.png"}
    assert not list(tmp_path.glob(".me.*")), "the killed run's temporary folder was left behind"


def _sr_argv(data: Path, out: Path) -> list[str]:
    return ["train", "sr", "--data", str(data), "--out", str(out), "--preset", "tiny", "--frames", "3",
            "--steps", "16", "--log-every", "1", "--checkpoint-every", "1", "--val-every", "8",
            "--val-identities", "b", "--threads", "1"]


def test_train_sr_killed_then_resumed_ends_with_the_straight_runs_weights(sr_dataset, tmp_path):  # noqa: F811
    assert main(_sr_argv(sr_dataset, tmp_path / "straight")) == 0
    out = tmp_path / "killed"
    process = _subprocess(_sr_argv(sr_dataset, out))
    assert _kill_at_random(process, lambda: _logged(out) >= 2, delay=random.Random(1).uniform(0.0, 0.3))
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # whole, never half-written
    assert 1 <= int(state["step"]) < 16
    assert main(["train", "sr", "--data", str(sr_dataset), "--out", str(out), "--resume"]) == 0
    straight, _, _ = load_sr_model(tmp_path / "straight" / "model")
    resumed, _, meta = load_sr_model(out / "model")
    assert meta["step"] == 16
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob("*.tmp")), "temporary files of the killed run were left behind"
