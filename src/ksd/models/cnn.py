"""Convolutional classifiers from the DeepOBS benchmark suite (Schneider et al., 2019).

* ``2c2d`` (MNIST): conv 32 5×5 → max-pool 2 → conv 64 5×5 → max-pool 2 → fc 1024 → fc classes.
* ``3c3d`` (CIFAR-10): conv 64 5×5 → max-pool 3/2 → conv 96 3×3 → max-pool 3/2 → conv 128 3×3 (same)
  → max-pool 3/2 → fc 512 → fc 256 → fc classes.

Only ``nn.Conv2d``, ``nn.Linear``, activations and pooling, so K-BFGS and K-FAC see every layer.
TensorFlow's "same" max-pooling of DeepOBS is approximated by one pixel of padding.
"""

from __future__ import annotations

import torch
from torch import nn

from ksd.models.layers import ACTIVATIONS, dense_stack


def _conv_block(
    c_in: int, c_out: int, k: int, padding: int, activation: str, pool: nn.Module
) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=padding), ACTIVATIONS[activation](), pool]


def _head(
    input_shape: tuple[int, ...],
    features: nn.Sequential,
    widths: list[int],
    activation: str,
    num_classes: int,
) -> nn.Sequential:
    with torch.no_grad():
        flat = features(torch.zeros(1, *input_shape)).numel()
    return nn.Sequential(*features, nn.Flatten(), *dense_stack([flat, *widths, num_classes], activation))


def cnn_2c2d(input_shape: tuple[int, ...], activation: str, num_classes: int) -> nn.Sequential:
    c = input_shape[0]
    features = nn.Sequential(
        *_conv_block(c, 32, 5, 2, activation, nn.MaxPool2d(2)),
        *_conv_block(32, 64, 5, 2, activation, nn.MaxPool2d(2)),
    )
    return _head(input_shape, features, [1024], activation, num_classes)


def cnn_3c3d(input_shape: tuple[int, ...], activation: str, num_classes: int) -> nn.Sequential:
    c = input_shape[0]
    features = nn.Sequential(
        *_conv_block(c, 64, 5, 0, activation, nn.MaxPool2d(3, 2, padding=1)),
        *_conv_block(64, 96, 3, 0, activation, nn.MaxPool2d(3, 2, padding=1)),
        *_conv_block(96, 128, 3, 1, activation, nn.MaxPool2d(3, 2, padding=1)),
    )
    return _head(input_shape, features, [512, 256], activation, num_classes)


CNN_ARCHS = {"2c2d": cnn_2c2d, "3c3d": cnn_3c3d}
#: The DeepOBS network of each data set, picked by ``model.arch=auto``.
DEFAULT_ARCH = {"mnist": "2c2d", "cifar10": "3c3d"}
