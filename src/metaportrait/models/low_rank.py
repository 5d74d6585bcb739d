"""Low-rank updates of convolution and linear weights (LoRA, Hu et al. 2021), for fine-tuning on little data.

::

    parameters = add_low_rank(generator, names, rank=4)   # W -> W + up @ down, up = 0: the same network at first
    ... fine-tune `parameters` ...
    merge_low_rank(generator)                              # plain weights again: the checkpoint format is unchanged

A weight of shape ``(out, in, k, k)`` (or ``(out, in)``) is read as an ``out x (in k k)`` matrix; its update is the
product of ``up`` ``(out, r)`` and ``down`` ``(r, in k k)``, so a layer adapts ``r (out + in k k)`` numbers instead
of ``out in k k``. Implemented with `torch.nn.utils.parametrize`, so every forward pass sees the updated weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

LAYERS = (nn.Conv2d, nn.Linear)


class LowRankUpdate(nn.Module):
    """``weight + (up @ down).view_as(weight)``; ``up`` starts at zero, ``down`` at Kaiming-uniform (LoRA's init)."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        fan_in = weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        self.down = nn.Parameter(torch.empty(rank, fan_in, dtype=weight.dtype).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).view_as(weight)


def add_low_rank(model: nn.Module, weight_names: set[str], rank: int) -> list[nn.Parameter]:
    """Give every `LAYERS` module whose ``<name>.weight`` is in ``weight_names`` a rank-``rank`` update (capped at
    the matrix's smaller side). Returns the updates' parameters (adapt those alone: the original weights are
    still parameters of ``model``)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    parameters: list[nn.Parameter] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LAYERS) and f"{name}.weight" in weight_names:
            weight = module.weight
            update = LowRankUpdate(weight.detach(), min(rank, weight.shape[0], weight[0].numel()))
            parametrize.register_parametrization(module, "weight", update)
            parameters += [update.down, update.up]
    if not parameters:
        raise ValueError("no convolution or linear weight among the names given")
    return parameters


def merge_low_rank(model: nn.Module) -> None:
    """Fold every update into its weight and remove the parametrisation."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
