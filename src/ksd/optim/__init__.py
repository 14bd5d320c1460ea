"""Optimizers, each a module with one class that has a ``Config`` dataclass.

:data:`OPTIMIZERS` maps the ``optimizer.name`` of a config to ``module:Class``; modules are
imported only when used, so one optimizer's dependencies never slow the others down.

The library API (:mod:`ksd.optim.api`): ``KSD``, ``HessianFree``, ``KBFGS``, ``KBFGSL``, ``KFAC``,
``ARCsLSR1``, ``LBFGS``, ``NonlinearCG``, ``SGD``, ``Adam``, ``RMSprop``, ``AdaGrad``, each built as
``KSD(model, loss_fn, **hyperparameters)`` and stepped as ``step(inputs, targets)``, on the same classes.
"""

from __future__ import annotations

import importlib
import importlib.util

from ksd.config import ConfigError
from ksd.optim.api import (
    KBFGS,
    KBFGSL,
    KFAC,
    KSD,
    LBFGS,
    LIBRARY,
    SGD,
    AdaGrad,
    Adam,
    ARCsLSR1,
    HessianFree,
    ModelOptimizer,
    NonlinearCG,
    RMSprop,
)
from ksd.optim.base import Diverged, Optimizer, OptimizerConfig, Stats
from ksd.problem import Problem

OPTIMIZERS: dict[str, str] = {
    "sgd": "ksd.optim.first_order:SGD",
    "adam": "ksd.optim.first_order:Adam",
    "rmsprop": "ksd.optim.first_order:RMSprop",
    "adagrad": "ksd.optim.first_order:AdaGrad",
    "lbfgs": "ksd.optim.lbfgs:LBFGS",
    "ncg": "ksd.optim.ncg:NonlinearCG",
    "hf": "ksd.optim.hf:HessianFree",
    "ksd": "ksd.optim.ksd:KrylovSubspaceDescent",
    "kbfgs": "ksd.optim.kbfgs:KBFGS",
    "kbfgs_l": "ksd.optim.kbfgs:KBFGSL",
    "kfac": "ksd.optim.kfac:KFAC",
    "arcs_lsr1": "ksd.optim.arcs_lsr1:ARCsLSR1",
}


def available() -> list[str]:
    """Names of the optimizers whose module exists in this installation."""
    return [name for name in OPTIMIZERS if importlib.util.find_spec(OPTIMIZERS[name].split(":")[0])]


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class registered as ``name``."""
    if name not in OPTIMIZERS or name not in available():
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(available())}.")
    module, cls = OPTIMIZERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_optimizer(config: OptimizerConfig, problem: Problem) -> Optimizer:
    """The optimizer described by a validated config, bound to ``problem``."""
    return optimizer_class(config.name)(problem, config)


__all__ = [
    "KBFGS",
    "KBFGSL",
    "KFAC",
    "KSD",
    "LBFGS",
    "LIBRARY",
    "OPTIMIZERS",
    "SGD",
    "ARCsLSR1",
    "AdaGrad",
    "Adam",
    "Diverged",
    "HessianFree",
    "ModelOptimizer",
    "NonlinearCG",
    "Optimizer",
    "OptimizerConfig",
    "RMSprop",
    "Stats",
    "available",
    "build_optimizer",
]
