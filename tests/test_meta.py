"""Reptile (`metaportrait.meta.reptile`): the inner loop's budgets, frozen parameters and fresh optimiser, the outer
update, and `Generator.part_parameters`; tiny networks on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from metaportrait.meta.reptile import WeightAverage, adapt, reptile_update, restore, snapshot
from test_train import astronaut_face, dataset_dir  # noqa: F401  (fixtures: a tiny prepared dataset)


def _regression_task(seed: int, count: int = 50):
    """Batches of a linear regression y = a x + b (a task), for a 1 -> 1 linear model."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, generator=generator)
    for _ in range(count):
        x = torch.randn(8, 1, generator=generator)
        yield {"x": x, "y": a * x + b}


def _mse(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).square().mean()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))


def test_adapt_lowers_the_loss_and_only_moves_the_chosen_parameters():
    model = _model()
    first, last = model[0], model[2]
    before = snapshot(model, [n for n, _ in model.named_parameters()])
    result = adapt(model, _regression_task(1), _mse, list(last.parameters()), lr=0.05, steps=30, grad_clip=10.0)
    assert result.steps == 30 and len(result.losses) == 30
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert torch.equal(first.weight, before["0.weight"]) and torch.equal(first.bias, before["0.bias"])
    assert not torch.equal(last.weight, before["2.weight"])
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the call
    assert model.training


def test_adapt_stops_at_the_time_budget_or_when_batches_run_out():
    model = _model()

    def slow_loss(model, batch):
        time.sleep(0.05)
        return _mse(model, batch)

    result = adapt(model, _regression_task(1), slow_loss, list(model.parameters()), lr=0.01, seconds=0.3)
    assert 2 <= result.steps <= 8 and result.seconds >= 0.3
    result = adapt(model, _regression_task(1, count=3), _mse, list(model.parameters()), lr=0.01, steps=10)
    assert result.steps == 3
    with pytest.raises(ValueError, match="budget"):
        adapt(model, _regression_task(1), _mse, list(model.parameters()), lr=0.01)
    with pytest.raises(ValueError, match="subset"):
        adapt(model, _regression_task(1), _mse, [nn.Parameter(torch.zeros(1))], lr=0.01, steps=1)


def test_adapt_uses_a_fresh_optimiser_per_call():
    """Two calls from the same weights on the same batches end at the same weights (no Adam state carried over)."""
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    theta = snapshot(model, names)
    adapt(model, _regression_task(2), _mse, list(model.parameters()), lr=0.05, steps=5)
    once = snapshot(model, names)
    restore(model, theta)
    adapt(model, _regression_task(2), _mse, list(model.parameters()), lr=0.05, steps=5)
    again = snapshot(model, names)
    assert all(torch.equal(once[n], again[n]) for n in names)


def test_weight_average_follows_the_steps_and_swaps_in_and_out():
    """The average is the warm-started EMA of the weights after every step; `swap` exchanges it with the
    parameters, and swapping twice restores both."""
    model = _model()
    parameters = list(model.parameters())
    start = [p.detach().clone() for p in parameters]
    average = WeightAverage(parameters, decay=0.9)
    trajectory = []
    adapt(model, _regression_task(3), _mse, parameters, lr=0.05, steps=20, average=average,
          on_step=lambda *_: trajectory.append([p.detach().clone() for p in parameters]))
    expected = [s.clone() for s in start]
    for n, weights in enumerate(trajectory):
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(average.values, expected))
    last = [p.detach().clone() for p in parameters]
    assert not all(torch.allclose(a, w) for a, w in zip(average.values, last))
    average.swap()
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(parameters, expected))
    average.swap()
    assert all(torch.equal(p, w) for p, w in zip(parameters, last))
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(parameters, decay=1.0)


def test_reptile_update_moves_theta_toward_the_mean_adapted_weights():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    theta = snapshot(model, names)
    adapted = []
    for seed in (3, 4):
        restore(model, theta)
        adapt(model, _regression_task(seed), _mse, list(model.parameters()), lr=0.05, steps=10)
        adapted.append(snapshot(model, names))
    stats = reptile_update(model, theta, adapted, epsilon=0.25)
    for name, value in model.named_parameters():
        mean = (adapted[0][name] + adapted[1][name]) / 2
        assert torch.allclose(value, theta[name] + 0.25 * (mean - theta[name]), atol=1e-7)
    assert stats["step_norm"] == pytest.approx(0.25 * stats["delta_norm"]) and stats["delta_norm"] > 0
    # epsilon = 1 with one task lands on the adapted weights (theta + (phi - theta): up to one rounding).
    restore(model, theta)
    reptile_update(model, theta, adapted[:1], epsilon=1.0)
    assert all(torch.allclose(p, adapted[0][n], rtol=0, atol=1e-7) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="epsilon"):
        reptile_update(model, theta, adapted, epsilon=1.5)


def test_reptile_meta_learns_a_shared_start_for_a_family_of_tasks():
    """Tasks y = a x + b with a near 2: after Reptile, 3 inner steps fit an unseen task better than from the
    starting weights (the outer loop learned something, not just the inner one)."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    names = [n for n, _ in model.named_parameters()]

    def task(seed: int, count: int = 20):
        generator = torch.Generator().manual_seed(seed)
        a = 2.0 + 0.1 * torch.randn(1, generator=generator)
        b = 1.0 + 0.1 * torch.randn(1, generator=generator)
        for _ in range(count):
            x = torch.randn(8, 1, generator=generator)
            yield {"x": x, "y": a * x + b}

    def query_error(seed: int) -> float:
        theta = snapshot(model, names)
        adapt(model, task(seed), _mse, list(model.parameters()), lr=0.05, steps=3)
        batch = next(task(seed + 1000))
        error = float(_mse(model, batch).detach())
        restore(model, theta)
        return error

    before = query_error(999)
    for step in range(60):
        theta = snapshot(model, names)
        adapted = []
        for seed in (2 * step, 2 * step + 1):
            restore(model, theta)
            adapt(model, task(seed), _mse, list(model.parameters()), lr=0.05, steps=5)
            adapted.append(snapshot(model, names))
        reptile_update(model, theta, adapted, epsilon=0.5)
    assert query_error(999) < 0.5 * before


def test_generator_parts_split_the_parameters():
    from metaportrait.config import PRESETS
    from metaportrait.models.generator import PARTS, Generator

    generator = Generator(PRESETS["tiny"])
    named = {part: {n for n, _ in generator.part_parameters(part)} for part in PARTS}
    assert named["all"] == {n for n, _ in generator.named_parameters()}
    assert named["warp"] | named["refine"] == named["all"] and not named["warp"] & named["refine"]
    assert named["decoder"] < named["refine"] and named["decoder"]
    norms = dict(generator.part_parameters("norms"))
    assert norms and any(n.endswith(".bias") for n in norms)
    assert all(p.numel() == max(p.shape) for p in norms.values())  # vectors, whatever their number of dimensions
    with pytest.raises(ValueError, match="unknown part"):
        generator.part_parameters("heads")


# ----------------------------------------------------------------------------------------------------------------
# train meta


def _meta_config(init, **changes):
    from metaportrait.train.meta import MetaConfig

    settings = dict(init=str(init), part="refine", size=64, steps=3, inner_steps=2, tasks_per_step=2, batch_size=1,
                    val_identities=("blue",), val_every=2, checkpoint_every=1, val_query_pairs=2, threads=1)
    return MetaConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    from metaportrait.config import PRESETS
    from metaportrait.io.checkpoint import save_model
    from metaportrait.models.generator import Generator

    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("init") / "tiny", Generator(PRESETS["tiny"]), PRESETS["tiny"])


def test_train_meta_logs_validates_and_resumes_exactly(dataset_dir, tiny_init, tmp_path, monkeypatch):
    import json

    from metaportrait.errors import InputError
    from metaportrait.io.checkpoint import load_model
    from metaportrait.train.meta import train_meta

    cfg = _meta_config(tiny_init)
    train_meta(cfg, dataset_dir, tmp_path / "straight", progress=False)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["epsilon"] for r in log] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all(r["identities"] == ["astro", "astro"] for r in log)  # "blue" is held out
    assert all(r["delta_norm"] > 0 for r in log)
    val = [json.loads(line) for line in (tmp_path / "straight" / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 2, 3] and all("psnr_after" in r and "psnr_before" in r for r in val)
    straight, _ = load_model(tmp_path / "straight" / "model")
    start, _ = load_model(tiny_init)
    a, b = start.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("dense_motion_network."))  # part "refine"
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("SPDAE_G."))
    # Interrupted after the checkpoint of step 2 and resumed: the same weights as the uninterrupted run.
    import metaportrait.train.meta as module

    exports = []

    def export_then_stop(folder, *args):
        export_model(folder, *args)
        exports.append(folder)
        if len(exports) == 2:
            raise KeyboardInterrupt

    export_model = module.export_model
    monkeypatch.setattr(module, "export_model", export_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_meta(cfg, dataset_dir, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    train_meta(cfg, dataset_dir, tmp_path / "resumed", resume=True, progress=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()] == [
        1, 2, 3]
    resumed, _ = load_model(tmp_path / "resumed" / "model")
    c = resumed.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(InputError, match="already holds"):
        train_meta(cfg, dataset_dir, tmp_path / "straight", progress=False)
    with pytest.raises(InputError, match="differ"):
        train_meta(_meta_config(tiny_init, inner_lr=0.01), dataset_dir, tmp_path / "resumed", resume=True,
                   progress=False)


def test_train_meta_cli_resolves_the_config(dataset_dir, tiny_init, tmp_path, capsys):
    import json

    from metaportrait.cli import main

    argv = ["train", "meta", "--init", str(tiny_init), "--data", str(dataset_dir), "--out", str(tmp_path / "run"),
            "--inner-steps", "3", "--outer-lr", "0.5", "--tasks-per-step", "4", "--steps", "7", "--dry-run"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["inner_steps"], printed["outer_lr"], printed["tasks_per_step"], printed["steps"]) == (3, 0.5, 4, 7)
    assert main([*argv, "--inner-steps", "0"]) == 2
    assert "invalid settings" in capsys.readouterr().err
    # Resuming: the run's own values may be repeated, other values of fixed settings are one error line.
    (tmp_path / "run").mkdir()
    resume = [*argv, "--resume", "--steps", "9", "--val-identities", "blue"]
    (tmp_path / "run" / "meta_config.json").write_text(json.dumps({**printed, "val_identities": ["blue"]}))
    assert main(resume) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 9
    assert main([*resume, "--outer-lr", "0.7"]) == 2
    assert "cannot change ['outer_lr']" in capsys.readouterr().err


def test_two_process_meta_training_matches_one_process_with_both_tasks(dataset_dir, tiny_init, tmp_path):
    """torchrun with 2 CPU processes (gloo), one task each, all-reduced deltas: the weights of 1 process, 2 tasks."""
    import json
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from metaportrait.io.checkpoint import load_model
    from metaportrait.train.meta import train_meta
    from test_train import _free_port

    cfg = _meta_config(tiny_init, val_every=10)
    train_meta(cfg, dataset_dir, tmp_path / "single", progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_meta import _meta_config
        from metaportrait.train.meta import train_meta
        train_meta(_meta_config({str(tiny_init)!r}, val_every=10), {str(dataset_dir)!r}, {str(tmp_path / "ddp")!r},
                   progress=False)
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    single, _ = load_model(tmp_path / "single" / "model")
    ddp, _ = load_model(tmp_path / "ddp" / "model")
    start, _ = load_model(tiny_init)
    a, b, c = single.state_dict(), ddp.state_dict(), start.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the weights moved: equality is not trivial
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("single", "ddp")]  # fmt: skip
    assert [r["world_size"] for r in logs[1]] == [2, 2, 2]
    for one, two in zip(*logs):
        assert one["inner_loss_first"] == pytest.approx(two["inner_loss_first"], rel=1e-6)
        assert one["delta_norm"] == pytest.approx(two["delta_norm"], rel=1e-6)
