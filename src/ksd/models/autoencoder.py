"""Deep autoencoders of Hinton & Salakhutdinov (2006), as trained by Martens (2010), Vinyals & Povey
(2012) and Goldfarb et al. (2020): a dense encoder to a *linear* code layer and its mirror image,
ending in logits (the loss applies the output non-linearity).
"""

from __future__ import annotations

from math import prod

from torch import nn

from ksd.models.layers import dense_stack

#: Encoder widths of the papers' autoencoders (the decoder mirrors them).
PAPER_WIDTHS: dict[str, list[int]] = {
    "mnist": [1000, 500, 250, 30],
    "curves": [400, 200, 100, 50, 25, 6],
}


def autoencoder(input_shape: tuple[int, ...], widths: list[int], activation: str) -> nn.Sequential:
    """``d → widths → reversed(widths[:-1]) → d`` with a linear code layer ``widths[-1]``."""
    d = prod(input_shape)
    all_widths = [d, *widths, *reversed(widths[:-1]), d]
    code_index = len(widths) - 1
    return nn.Sequential(nn.Flatten(), *dense_stack(all_widths, activation, linear_at={code_index}))
