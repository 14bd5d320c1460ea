"""Building blocks shared by the models: activations, dense stacks and initialisations."""

from __future__ import annotations

import itertools

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def dense_stack(widths: list[int], activation: str, linear_at: set[int] = frozenset()) -> list[nn.Module]:
    """Linear layers ``widths[0] → widths[1] → …`` with ``activation`` after every layer except the
    last and those whose index is in ``linear_at`` (e.g. the code layer of an autoencoder)."""
    layers: list[nn.Module] = []
    last = len(widths) - 2
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if i != last and i not in linear_at:
            layers.append(ACTIVATIONS[activation]())
    return layers


@torch.no_grad()
def sparse_init_(model: nn.Module, connections: int = 15, scale: float = 1.0) -> None:
    """Martens (2010) sparse initialisation: each unit gets exactly ``connections`` non-zero incoming
    weights drawn from ``N(0, scale²)`` (all of them when the fan-in is smaller); biases are zero.

    Applies to every ``nn.Linear`` and ``nn.Conv2d`` (a conv output channel is one unit whose fan-in
    is ``in_channels · k_h · k_w``). Uses the global torch generator, so ``torch.manual_seed`` fixes it.
    """
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        weight = module.weight.view(module.weight.shape[0], -1)
        fan_in = weight.shape[1]
        k = min(connections, fan_in)
        chosen = torch.rand(weight.shape).argsort(dim=1)[:, :k]
        weight.zero_()
        weight.scatter_(1, chosen, torch.randn(weight.shape[0], k) * scale)
        if module.bias is not None:
            module.bias.zero_()
