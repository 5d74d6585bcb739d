"""Reptile (`metaportrait.meta.reptile`): the inner loop's budgets, frozen parameters and fresh optimiser, the outer
update, and `Generator.part_parameters`; tiny networks on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from metaportrait.meta.reptile import adapt, reptile_update, restore, snapshot


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
    # epsilon = 1 with one task lands on the adapted weights.
    restore(model, theta)
    reptile_update(model, theta, adapted[:1], epsilon=1.0)
    assert all(torch.equal(p, adapted[0][n]) for n, p in model.named_parameters())
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
    with pytest.raises(ValueError, match="unknown part"):
        generator.part_parameters("norms")
