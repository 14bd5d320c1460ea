"""Fully connected classifier (the HF demo's 784-1000-500-250-30-10 by default)."""

from __future__ import annotations

from math import prod

from torch import nn

from ksd.models.layers import dense_stack

DEFAULT_WIDTHS = [1000, 500, 250, 30]


def mlp(input_shape: tuple[int, ...], widths: list[int], activation: str, num_classes: int) -> nn.Sequential:
    """``d → widths → num_classes`` logits."""
    return nn.Sequential(nn.Flatten(), *dense_stack([prod(input_shape), *widths, num_classes], activation))
