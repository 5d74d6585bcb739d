"""Low-rank weight updates (`metaportrait.models.low_rank`): the start is the network itself, only the updates
learn, and merging gives plain weights with the same outputs."""

import pytest
import torch
from torch import nn

from metaportrait.models.low_rank import add_low_rank, merge_low_rank


def small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_updates_start_at_zero_learn_alone_and_merge_into_plain_weights():
    network = small_network()
    inputs = torch.rand(2, 3, 6, 6)
    before = network(inputs).detach()
    names = {"0.weight", "3.weight"}
    parameters = add_low_rank(network, names, rank=2)
    assert [tuple(p.shape) for p in parameters] == [(2, 27), (8, 2), (2, 288), (5, 2)]
    assert torch.equal(network(inputs), before)  # `up` starts at zero
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        network(inputs).square().mean().backward()
        optimizer.step()
    adapted = network(inputs).detach()
    assert not torch.allclose(adapted, before)
    ups = parameters[1::2]
    delta = ups[0] @ parameters[0]
    assert torch.linalg.matrix_rank(delta) <= 2
    merge_low_rank(network)
    assert set(network.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # the checkpoint format
    assert torch.allclose(network(inputs), adapted, atol=1e-6)


def test_nothing_to_update_is_refused():
    network = small_network()
    with pytest.raises(ValueError, match="no convolution or linear weight"):
        add_low_rank(network, {"0.bias"}, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_low_rank(network, {"0.weight"}, rank=0)
