"""Reptile (Nichol et al. 2018, MetaPortrait §3.2) over any `torch.nn.Module`: the inner loop `adapt` and the
outer update `reptile_update`.

`adapt` is the one fine-tuning loop of the project's two callers: meta-training (`metaportrait.train.meta`, one
task = one identity) and personalisation (`metaportrait.personalize`, one person's video). Each call builds a
fresh Adam optimiser (MetaPortrait resets the inner optimiser per task, notes/methods.md §1.5), adapts only the
parameters it is given (the others are frozen for the call, which also skips their backward pass), and stops
after ``steps`` steps or once ``seconds`` of wall time have passed, whichever comes first.

The outer update is the plain Reptile rule theta <- theta + epsilon * mean_tasks(phi_task - theta) on the
adapted parameters; with epsilon = 1 and one task it moves theta onto phi.

This module knows nothing of the generator: the loss is a callable ``(model, batch) -> scalar tensor`` and the
parameters to adapt are chosen by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class AdaptResult:
    """What `adapt` did."""

    steps: int  # optimiser steps taken
    seconds: float  # wall time of the steps (batch preparation included, the ``on_step`` callback not)
    losses: list[float] = field(default_factory=list)  # the loss of every step, before its update


def adapt(
    model: nn.Module,
    batches: Iterable[Batch],
    loss: Callable[[nn.Module, Batch], torch.Tensor],
    parameters: Sequence[nn.Parameter],
    lr: float,
    steps: int | None = None,
    seconds: float | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
    grad_clip: float = 0.3,
    on_step: Callable[[int, float, float], None] | None = None,
    average: WeightAverage | None = None,
) -> AdaptResult:
    """Fine-tune ``parameters`` of ``model`` in place on ``batches`` with a fresh Adam optimiser.

    Args:
        model: the network (put in train mode for the call, then back in its previous mode).
        batches: training batches, consumed one per step; the loop also ends when they run out.
        loss: ``(model, batch) -> scalar tensor`` to minimise.
        parameters: the parameters to adapt (a subset of ``model.parameters()``); the others are frozen
            (``requires_grad`` False) during the call and restored after it.
        lr: Adam learning rate.
        steps: at most this many steps (None: no step bound).
        seconds: no step starts once the steps so far took this much wall time (batch preparation included,
            ``on_step`` not; None: no time bound).
        betas: Adam betas (MetaPortrait's inner loop: (0.5, 0.999)).
        grad_clip: maximum global gradient norm (gradients go through ``nan_to_num`` first, as the official code).
        on_step: called after every step with ``(step, loss, elapsed seconds)`` (e.g. a progress bar).
        average: a `WeightAverage` of ``parameters``, updated after every step (the caller swaps it in).

    Raises:
        ValueError: no bound is given, an empty parameter list, or a parameter that is not ``model``'s.
    """
    if steps is None and seconds is None:
        raise ValueError("adapt needs a budget: steps, seconds or both")
    if (steps is not None and steps < 0) or (seconds is not None and seconds < 0) or lr <= 0:
        raise ValueError(f"steps and seconds must be >= 0 and lr > 0, got {steps}, {seconds}, {lr}")
    chosen = {id(p) for p in parameters}
    owned = {id(p) for p in model.parameters()}
    if not chosen or not chosen <= owned:
        raise ValueError("parameters must be a non-empty subset of the model's parameters")
    previous_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.Adam(list(parameters), lr=lr, betas=betas)  # fresh per call: no state across tasks
    model.train()
    result = AdaptResult(steps=0, seconds=0.0)
    try:
        batch_iterator: Iterator[Batch] = iter(batches)
        while (steps is None or result.steps < steps) and (seconds is None or result.seconds < seconds):
            tick = time.perf_counter()
            batch = next(batch_iterator, None)
            if batch is None:
                break
            value = loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            clip_gradients(parameters, grad_clip)
            optimizer.step()
            if average is not None:
                average.update()
            result.steps += 1
            result.losses.append(float(value.detach()))
            result.seconds += time.perf_counter() - tick  # the callback's time is not counted
            if on_step is not None:
                on_step(result.steps, result.losses[-1], result.seconds)
    finally:
        for p, requires_grad in previous_requires_grad:
            p.requires_grad_(requires_grad)
        model.train(was_training)
    return result


class WeightAverage:
    """An exponential moving average of parameters along an optimisation: ``avg <- d * avg + (1 - d) * p`` after
    every step, with ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update so that the first steps are not
    held back by the starting weights.

    Fine-tuning with batches of 2 moves the weights noisily, and the average of the trajectory's last steps is a
    common remedy. For `personalize` it removed most of the late drift on two of three people and not on the
    third, so it is off by default there (docs/experiments.md, 2026-12-07).
    """

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.values = [p.detach().clone() for p in self.parameters]

    def update(self) -> None:
        """Fold the parameters' current values into the average."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for avg, p in zip(self.values, self.parameters):
                avg.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    def swap(self) -> None:
        """Exchange the parameters' values with the average's (twice restores both)."""
        with torch.no_grad():
            for avg, p in zip(self.values, self.parameters):
                current = p.detach().clone()
                p.copy_(avg)
                avg.copy_(current)


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float, nan_bound: float = 1e3) -> torch.Tensor:
    """``nan_to_num`` (+-``nan_bound``) then clip the global gradient norm to ``max_norm``; returns the norm before
    clipping (0 when no parameter has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=nan_bound, neginf=-nan_bound)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters of ``model`` (theta, before a task's inner loop)."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in names}


def restore(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (a `snapshot`) back into ``model``'s parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def reptile_update(
    model: nn.Module,
    theta: dict[str, torch.Tensor],
    adapted: Sequence[dict[str, torch.Tensor]],
    epsilon: float,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    task_count: int | None = None,
) -> dict[str, float]:
    """The outer step: set ``model``'s parameters to theta + epsilon * mean_tasks(phi_task - theta).

    Args:
        model: the network; its named parameters in ``theta`` are overwritten (the others are left alone).
        theta: the meta-weights before the tasks (`snapshot`).
        adapted: per task, the adapted weights phi (`snapshot` after `adapt`), with the names of ``theta``.
        epsilon: the outer step size (1: the mean of the adapted weights).
        all_reduce: with several processes that each adapted their own tasks: sums a tensor over the processes
            in place (``torch.distributed.all_reduce``), so every process takes the same step.
        task_count: the number of tasks over all processes (default ``len(adapted)``).

    Returns:
        ``{"delta_norm": |mean(phi - theta)|, "step_norm": epsilon * delta_norm}`` for logging.
    """
    if not adapted:
        raise ValueError("reptile_update needs at least one adapted task")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    task_count = len(adapted) if task_count is None else task_count
    params = dict(model.named_parameters())
    squared = 0.0
    with torch.no_grad():
        for name, start in theta.items():
            # A sum then one division: the same numbers whether the tasks ran in one process or in several.
            delta_sum = adapted[0][name] - start
            for phi in adapted[1:]:
                delta_sum += phi[name] - start
            if all_reduce is not None:
                all_reduce(delta_sum)
            mean_delta = delta_sum / task_count
            squared += float(mean_delta.square().sum())
            params[name].copy_(start + epsilon * mean_delta)
    norm = squared**0.5
    return {"delta_norm": norm, "step_norm": epsilon * norm}
