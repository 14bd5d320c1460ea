"""Models: ``build_model`` turns a model config and a data set's spec into a network and its loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ksd.config import ModelConfig
from ksd.data import DataSpec
from ksd.errors import ConfigError, require
from ksd.losses import LOSSES, Loss, build_loss
from ksd.models.autoencoder import PAPER_WIDTHS, autoencoder
from ksd.models.charlm import DEFAULT_WIDTHS as CHARLM_WIDTHS
from ksd.models.charlm import CharLM
from ksd.models.cnn import CNN_ARCHS, DEFAULT_ARCH
from ksd.models.custom import build_custom
from ksd.models.layers import ACTIVATIONS, sparse_init_
from ksd.models.mlp import DEFAULT_WIDTHS, mlp

MODELS = ("autoencoder", "mlp", "cnn", "charlm", "custom")


def check_node(node: Any) -> None:
    """The ``model`` node names a model, activation, CNN architecture and loss of this registry
    (``config.validate`` calls it, from the runner)."""
    require(node.name in MODELS, f"model.name must be one of {', '.join(MODELS)}, got {node.name!r}.")
    require(
        node.activation in ACTIVATIONS,
        f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {node.activation!r}.",
    )
    require(
        node.arch in ("auto", *CNN_ARCHS),
        f"model.arch must be auto or one of {', '.join(CNN_ARCHS)}, got {node.arch!r}.",
    )
    require(
        node.loss is None or node.loss in LOSSES,
        f"model.loss must be null or one of {', '.join(LOSSES)}, got {node.loss!r}.",
    )


@dataclass
class BuiltModel:
    network: nn.Module
    loss: Loss
    autoencoder: bool  # targets are the inputs
    description: str


def build_model(cfg: ModelConfig, spec: DataSpec) -> BuiltModel:
    """The network of ``cfg`` for data described by ``spec``; :class:`ConfigError` if they do not fit."""
    if (cfg.name == "charlm") != (spec.name == "text") and cfg.name != "custom":
        raise ConfigError("model=charlm and dataset=text go together (or dataset=text with model=custom).")
    if cfg.name == "charlm":
        loss_name = cfg.loss or "sequence_cross_entropy"
        if loss_name != "sequence_cross_entropy":
            raise ConfigError("model=charlm needs loss sequence_cross_entropy.")
        widths = cfg.widths if cfg.widths is not None else CHARLM_WIDTHS
        network = CharLM(spec.num_classes, cfg.embedding, widths)
        arch = f"embedding {cfg.embedding}, LSTM {'-'.join(map(str, widths))}, {spec.num_classes} characters"
    elif cfg.name == "custom":
        network, loss_name, arch = build_custom(cfg, spec)
    elif cfg.name == "autoencoder":
        widths = cfg.widths if cfg.widths is not None else PAPER_WIDTHS.get(spec.name)
        if widths is None:
            raise ConfigError(
                f"model=autoencoder has paper architectures for {' and '.join(PAPER_WIDTHS)} only, "
                f"not {spec.name}; pick one of those data sets or set model.widths."
            )
        network = autoencoder(spec.input_shape, widths, cfg.activation)
        loss_name = cfg.loss or "sigmoid_cross_entropy"
        if loss_name == "softmax_cross_entropy":
            raise ConfigError(
                "model=autoencoder needs a reconstruction loss (sigmoid_cross_entropy or squared_error)."
            )
        arch = "-".join(map(str, [*widths, *reversed(widths[:-1])]))
    else:
        if spec.num_classes is None:
            raise ConfigError(
                f"model={cfg.name} is a classifier but dataset {spec.name} has no labels; "
                "use model=autoencoder."
            )
        loss_name = cfg.loss or "softmax_cross_entropy"
        if loss_name != "softmax_cross_entropy":
            raise ConfigError(f"model={cfg.name} is a classifier and needs loss softmax_cross_entropy.")
        if cfg.name == "mlp":
            widths = cfg.widths if cfg.widths is not None else DEFAULT_WIDTHS
            network = mlp(spec.input_shape, widths, cfg.activation, spec.num_classes)
            arch = "-".join(map(str, [*widths, spec.num_classes]))
        else:
            arch = DEFAULT_ARCH.get(spec.name) if cfg.arch == "auto" else cfg.arch
            if arch is None:
                raise ConfigError(f"model=cnn has no default architecture for {spec.name}; set model.arch.")
            network = CNN_ARCHS[arch](spec.input_shape, cfg.activation, spec.num_classes)
    if cfg.init == "sparse":
        sparse_init_(network, cfg.sparse_connections, scale=0.5 if cfg.activation == "tanh" else 1.0)
    n_params = sum(p.numel() for p in network.parameters())
    activation = "" if cfg.name == "custom" else f"{cfg.activation}, "
    description = f"{cfg.name} {arch} ({activation}{loss_name}, {cfg.init} init, {n_params:,} parameters)"
    reconstructs = cfg.name == "autoencoder" or (cfg.name == "custom" and spec.num_classes is None)
    return BuiltModel(network, build_loss(loss_name), reconstructs, description)


__all__ = ["ACTIVATIONS", "CNN_ARCHS", "MODELS", "BuiltModel", "build_model", "check_node"]
