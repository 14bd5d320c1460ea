"""Model builders: paper architectures, refusals, sparse initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ksd.config import ModelConfig
from ksd.data import DataSpec
from ksd.errors import ConfigError
from ksd.models import build_model

MNIST = DataSpec("mnist", (1, 28, 28), 10, "test")
CURVES = DataSpec("curves", (1, 28, 28), None, "test")
CIFAR = DataSpec("cifar10", (3, 32, 32), 10, "test")


def widths(network: nn.Module) -> list[int]:
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def test_paper_autoencoders():
    assert widths(build_model(ModelConfig(), MNIST).network) == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert widths(build_model(ModelConfig(), CURVES).network) == [
        784,
        400,
        200,
        100,
        50,
        25,
        6,
        25,
        50,
        100,
        200,
        400,
        784,
    ]


def test_code_layer_is_linear():
    network = build_model(ModelConfig(), CURVES).network
    layers = list(network)
    code = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear) and m.out_features == 6)
    assert isinstance(layers[code + 1], nn.Linear)  # no activation after the code layer


def test_autoencoder_refuses_cifar_and_classifiers_refuse_curves():
    with pytest.raises(ConfigError, match="autoencoder"):
        build_model(ModelConfig(), CIFAR)
    with pytest.raises(ConfigError, match="no labels"):
        build_model(ModelConfig(name="mlp"), CURVES)


@pytest.mark.parametrize("spec", [MNIST, CIFAR])
def test_cnns_produce_class_logits(spec):
    network = build_model(ModelConfig(name="cnn", activation="relu"), spec).network
    assert network(torch.zeros(2, *spec.input_shape)).shape == (2, 10)


def test_sparse_init_has_fifteen_incoming_weights_per_unit():
    torch.manual_seed(0)
    network = build_model(ModelConfig(init="sparse"), MNIST).network
    for layer in (m for m in network.modules() if isinstance(m, nn.Linear)):
        nonzero = (layer.weight != 0).sum(dim=1)
        assert torch.all(nonzero == min(15, layer.in_features))
        assert torch.all(layer.bias == 0)
