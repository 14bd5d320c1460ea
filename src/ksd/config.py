"""Typed schemas of the configuration and their validation.

Hydra composes plain YAML from ``conf/``; :func:`validate` then merges every node into its
dataclass schema, so an unknown key, a value of the wrong type or an impossible value is refused
with one sentence (:class:`~ksd.errors.ConfigError`) before any data is read. Optimizer schemas live
beside their optimizers (``Optimizer.Config``). This module imports none of the registries above it: the
names a node may take (data sets, models, activations, losses, optimizers) are checked by the registry
that owns them, which the runner hands to :func:`validate` (:class:`Registries`, ``ksd.runner.REGISTRIES``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ksd.errors import ConfigError, require


@dataclass
class DatasetConfig:
    """``dataset`` group: which data, where it lives and how much of it to use."""

    name: str = "curves"  # a data set of ksd.data.DATASETS; with torchvision: a torchvision.datasets class
    root: str | None = None  # data folder; None: $KSD_DATA, else ./data
    val_size: int = 0  # validation examples carved from the training set (seeded permutation)
    train_size: int | None = None  # keep only the first N remaining training examples
    test_size: int | None = None  # keep only the first N test examples
    augment: bool = False  # random crop + flip on training mini-batches (CIFAR-10 only)
    path: str | None = None  # text: the corpus file (None: the built-in corpus); tensors: the .npz/.pt file
    seq_len: int = 64  # text only: characters per example
    torchvision: bool = False  # name is a class of torchvision.datasets (conf/dataset/torchvision.yaml)
    download: bool = False  # torchvision only: download the files into root when they are missing

    def __post_init__(self) -> None:  # after ksd.data.check_node: the data set's name and path
        require(not self.download or self.torchvision, "dataset.download is for dataset=torchvision only.")
        require(self.val_size >= 0, f"dataset.val_size must be >= 0, got {self.val_size}.")
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            require(value is None or value > 0, f"dataset.{key} must be positive or null, got {value}.")
        require(not self.augment or self.name == "cifar10", "dataset.augment is only available for cifar10.")
        require(self.seq_len >= 1, f"dataset.seq_len must be >= 1, got {self.seq_len}.")


@dataclass
class ModelConfig:
    """``model`` group: architecture, activation, loss and initialisation."""

    name: str = "autoencoder"  # autoencoder | mlp | cnn | charlm | custom
    widths: list[int] | None = None  # hidden widths (encoder half for autoencoders; LSTM layers for charlm)
    embedding: int = 64  # charlm only: width of the character embedding
    arch: str = "auto"  # cnn only: auto | 2c2d | 3c3d
    activation: str = "sigmoid"  # hidden units: sigmoid | relu | tanh
    loss: str | None = None  # None: sigmoid_cross_entropy (autoencoder) / softmax_cross_entropy
    init: str = "default"  # default (PyTorch) | sparse (Martens 2010: 15 non-zero weights per unit)
    sparse_connections: int = 15
    target: str | None = None  # custom only: model._target_, the class (or function) that builds the network
    kwargs: dict[str, Any] = field(default_factory=dict)  # custom only: its keyword arguments (_model_node)

    def __post_init__(self) -> None:  # after ksd.models.check_node: name, activation, arch and loss
        require(
            self.init in ("default", "sparse"), f"model.init must be default or sparse, got {self.init!r}."
        )
        require(
            self.widths is None or all(w > 0 for w in self.widths),
            f"model.widths must be positive integers, got {self.widths}.",
        )
        require(self.sparse_connections > 0, "model.sparse_connections must be positive.")
        require(self.embedding > 0, f"model.embedding must be positive, got {self.embedding}.")
        require(
            self.name == "custom" or (self.target is None and not self.kwargs),
            "model.target and model.kwargs are set by model=custom, from model._target_ and its other keys.",
        )


@dataclass
class RunConfig:
    """``run`` node: the budget, the evaluation schedule and the results a run leaves."""

    max_epochs: float | None = 10.0  # stop after this many passes of gradient examples over the train set
    max_steps: int | None = None  # stop after this many optimizer steps
    max_seconds: float | None = None  # stop after this much training wall time (evaluation excluded)
    eval_every: int = 50  # evaluate every N steps (and always at the start and the end)
    eval_seconds: float | None = None  # also evaluate once this much training time passed since the last row
    eval_epochs: float | None = None  # also evaluate once this many epochs passed since the last row
    eval_train_size: int | None = 10_000  # examples of the training set for train_loss (None: all)
    max_chunk: int = 10_000  # largest number of examples pushed through the network at once
    compile_curvature: bool = False  # torch.compile the curvature products of HF and KSD (ksd.curvature)
    progress: bool | None = None  # progress bar; None: only when stderr is a terminal
    plot: bool = True  # write convergence.png at the end
    skip_completed: bool = True  # ksd-run returns at once if out dir has a completed run of this config
    checkpoint_every: int = 10  # write checkpoint.pt every N evaluations (0: only on SIGTERM/SIGUSR2)
    on_divergence: str = "stop"  # stop: end the run as diverged | rewind: to the last evaluation (engine)
    rewind_loss_factor: float = 10.0  # rewind: also when train_loss > this × the last evaluation's
    max_rewinds: int = 5  # rewind: the run is diverged at the divergence after this many rewinds

    def __post_init__(self) -> None:
        require(
            any(v is not None for v in (self.max_epochs, self.max_steps, self.max_seconds)),
            "set at least one of run.max_epochs, run.max_steps, run.max_seconds.",
        )
        for key in ("max_epochs", "max_steps", "max_seconds"):
            value = getattr(self, key)
            require(value is None or value > 0, f"run.{key} must be positive or null, got {value}.")
        require(self.eval_every >= 1, f"run.eval_every must be >= 1, got {self.eval_every}.")
        require(
            self.eval_seconds is None or self.eval_seconds > 0,
            f"run.eval_seconds must be positive or null, got {self.eval_seconds}.",
        )
        require(
            self.eval_epochs is None or self.eval_epochs > 0,
            f"run.eval_epochs must be positive or null, got {self.eval_epochs}.",
        )
        require(self.max_chunk >= 1, f"run.max_chunk must be >= 1, got {self.max_chunk}.")
        require(
            self.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}."
        )
        require(
            self.eval_train_size is None or self.eval_train_size > 0,
            f"run.eval_train_size must be positive or null, got {self.eval_train_size}.",
        )
        require(
            self.on_divergence in ("stop", "rewind"),
            f"run.on_divergence must be stop or rewind, got {self.on_divergence!r}.",
        )
        require(
            self.rewind_loss_factor > 1,
            f"run.rewind_loss_factor must be > 1, got {self.rewind_loss_factor}.",
        )
        require(self.max_rewinds >= 1, f"run.max_rewinds must be >= 1, got {self.max_rewinds}.")


@dataclass
class LoggerConfig:
    """``logger`` group: metrics always go to CSV; ``wandb`` also mirrors them to Weights & Biases."""

    name: str = "csv"  # csv | wandb
    project: str = "ksd-run"
    entity: str | None = None
    group: str | None = None
    mode: str | None = None  # online | offline | disabled; None: online if an API key is configured

    def __post_init__(self) -> None:
        require(self.name in ("csv", "wandb"), f"logger.name must be csv or wandb, got {self.name!r}.")
        require(
            self.mode in (None, "online", "offline", "disabled"),
            f"logger.mode must be online, offline, disabled or null, got {self.mode!r}.",
        )


@dataclass
class Settings:
    """The validated configuration of one run."""

    dataset: DatasetConfig
    model: ModelConfig
    optimizer: Any  # the optimizer's own Config dataclass
    run: RunConfig
    logger: LoggerConfig
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"  # float32 | float64: the parameters, the data's floats and every computation


@dataclass(frozen=True)
class Registries:
    """What :func:`validate` needs from the registries above this module; the runner hands it over.

    Each registry checks the names of its own node (the values it can build), so that the schemas here
    import none of them. The checks see the node merged into its schema (types checked, defaults filled),
    before the schema's own range checks in ``__post_init__``.
    """

    dataset: Callable[[Any], None]  # checks a dataset node: ksd.data.check_node
    model: Callable[[Any], None]  # checks a model node: ksd.models.check_node
    optimizer: Callable[[str], type]  # the Config schema of optimizer.name: ksd.optim.config_schema


def _merge(schema: type, node: Any, where: str, check: Callable[[Any], None] | None = None) -> Any:
    """Instantiate ``schema`` from ``node``, turning OmegaConf and schema errors into one sentence.

    ``check`` (a registry's) sees the merged node before the schema's own checks run.
    """
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{where} must be a mapping of keys, got {node!r}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        if check is not None:
            check(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err).splitlines()[0].rstrip(".")
        if "not in struct" in reason or ("Key '" in reason and "not in" in reason):
            known = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(f"unknown key {where}.{key}; valid keys are: {known}.") from None
        raise ConfigError(f"invalid value for {where}.{key}: {reason}.") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {where}: {err}") from None


#: The keys of ``model=custom`` that ksd-run reads; all others are keyword arguments of ``model._target_``.
CUSTOM_MODEL_KEYS = ("name", "loss", "init", "sparse_connections")


def _model_node(node: Any) -> Any:
    """``model=custom``: ``_target_`` becomes ``target``, keys not in :data:`CUSTOM_MODEL_KEYS` ``kwargs``.

    The keyword arguments are the user's network's own, so they cannot be checked against a schema as the
    other models' keys are; Hydra checks them when it instantiates the target (``ksd.models.custom``).
    """
    if not isinstance(node, DictConfig) or node.get("name") != "custom":
        return node
    if "_target_" not in node or OmegaConf.is_missing(node, "_target_"):
        raise ConfigError("model=custom needs model._target_=pkg.module.Class, an importable nn.Module.")
    ours = {key: node[key] for key in CUSTOM_MODEL_KEYS if key in node}
    kwargs = {key: value for key, value in node.items() if key not in (*CUSTOM_MODEL_KEYS, "_target_")}
    return OmegaConf.create({**ours, "target": node["_target_"], "kwargs": kwargs})


def validate(cfg: DictConfig, registries: Registries) -> Settings:
    """Check the composed configuration against the schemas and the ``registries``' names; raise
    :class:`ConfigError` if unusable."""
    try:  # resolve against the whole config first: the node-wise merges below lose the root (${by_scale:..})
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve {err.full_key}: {str(err).splitlines()[0]}") from None
    require(isinstance(cfg.get("seed"), int), f"seed must be an integer, got {cfg.get('seed')!r}.")
    device = cfg.get("device")
    require(
        device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:"),
        f"device must be auto, cpu or cuda, got {device!r}.",
    )
    dtype = cfg.get("dtype", "float32")
    require(dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {dtype!r}.")
    opt_node = cfg.get("optimizer")
    require(isinstance(opt_node, DictConfig) and "name" in opt_node, "the optimizer config needs a name.")
    opt_schema = registries.optimizer(opt_node.name)
    return Settings(
        dataset=_merge(DatasetConfig, cfg.dataset, "dataset", registries.dataset),
        model=_merge(ModelConfig, _model_node(cfg.model), "model", registries.model),
        optimizer=_merge(opt_schema, opt_node, "optimizer"),
        run=_merge(RunConfig, cfg.run, "run"),
        logger=_merge(LoggerConfig, cfg.logger, "logger"),
        seed=cfg.seed,
        device=device,
        dtype=dtype,
    )
