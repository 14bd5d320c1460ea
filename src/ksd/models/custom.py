"""``model=custom``: your own network, ``model._target_=pkg.module.Class`` plus its keyword arguments.

Hydra instantiates the target (a class or a function returning an ``nn.Module``) with the other keys of
the model node (``+model.hidden=64``; nested ``_target_`` nodes are instantiated too, containers arrive as
plain dicts and lists). Its module must be importable: installed, or on ``PYTHONPATH``. The network
gets nothing about the data, so it must fit it by itself: on labelled data it maps a batch of inputs to
(N, classes) logits (softmax cross-entropy); on unlabelled data it reconstructs its inputs as (N, D) outputs,
D the number of input values (sigmoid cross-entropy by default, or ``model.loss=squared_error``).

Before training, one forward pass of two zero inputs in eval mode (no dropout draw, no batch-norm update)
checks that, so a network that does not fit the data is refused with one sentence instead of failing
inside the first step. K-BFGS and K-FAC precondition ``nn.Linear`` and ``nn.Conv2d`` layers only and
refuse, naming it, a network with another layer that has parameters; the other optimizers take any
differentiable network.
"""

from __future__ import annotations

from math import prod

import torch
from hydra.utils import instantiate
from torch import nn

from ksd.config import ModelConfig
from ksd.data import DataSpec
from ksd.errors import ConfigError, one_line


def build_custom(cfg: ModelConfig, spec: DataSpec) -> tuple[nn.Module, str, str]:
    """The network of ``cfg.target`` checked against ``spec``, the name of its loss and a description."""
    labelled = spec.num_classes is not None
    loss_name = cfg.loss or ("softmax_cross_entropy" if labelled else "sigmoid_cross_entropy")
    if labelled and loss_name != "softmax_cross_entropy":
        raise ConfigError(
            f"model=custom on labelled data ({spec.name}, {spec.num_classes} classes) needs loss "
            "softmax_cross_entropy."
        )
    if not labelled and loss_name == "softmax_cross_entropy":
        raise ConfigError(
            f"model=custom on unlabelled data ({spec.name}) reconstructs its inputs: use loss "
            "sigmoid_cross_entropy or squared_error."
        )
    target = cfg.target
    try:
        network = instantiate({"_target_": target, **cfg.kwargs}, _convert_="all")
    except Exception as err:  # Hydra's exception says where; the innermost cause says what
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ImportError):
            raise ConfigError(
                f"model._target_={target} cannot be imported ({one_line(cause)}); install its package or "
                "put its folder on PYTHONPATH."
            ) from None
        raise ConfigError(
            f"model._target_={target} could not be built: {one_line(cause)} (its keyword arguments are the "
            "model's other keys, added as +model.KEY=VALUE)."
        ) from None
    if not isinstance(network, nn.Module):
        raise ConfigError(f"model._target_={target} built a {type(network).__name__}, not a torch.nn.Module.")
    expected = (spec.num_classes,) if labelled else (prod(spec.input_shape),)
    what = f"{spec.num_classes} class logits" if labelled else "the flattened inputs (reconstruction)"
    shape = _output_shape(network, spec.input_shape, target)
    if shape != expected:
        raise ConfigError(
            f"model._target_={target} maps inputs of shape {spec.input_shape} to outputs of shape {shape}, "
            f"but {spec.name} needs {expected}: {what}."
        )
    arguments = ", ".join(f"{key}={value!r}" for key, value in cfg.kwargs.items())
    return network, loss_name, f"{target}({arguments})"


def _output_shape(network: nn.Module, input_shape: tuple[int, ...], target: str) -> tuple[int, ...] | None:
    """The per-example shape of the network's output on two zero inputs (eval mode, no gradient)."""
    training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(torch.zeros(2, *input_shape))
    except Exception as err:
        raise ConfigError(
            f"model._target_={target} failed on a batch of inputs of shape {input_shape}: {one_line(err)}"
        ) from None
    finally:
        network.train(training)
    return tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() >= 1 else None

