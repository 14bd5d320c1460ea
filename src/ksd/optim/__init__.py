"""Optimizers, each a module with one class that has a ``Config`` dataclass.

:data:`OPTIMIZERS` (:mod:`ksd.optim.registry`) maps the ``optimizer.name`` of a config to
``module:Class``; modules are imported only when used, so one optimizer's dependencies never slow the
others down.

The library API (:mod:`ksd.optim.api`): ``KSD``, ``HessianFree``, ``KBFGS``, ``KBFGSL``, ``KFAC``,
``ARCsLSR1``, ``TRON``, ``LBFGS``, ``NonlinearCG``, ``SGD``, ``Adam``, ``RMSprop``, ``AdaGrad``, each built as
``KSD(model, loss_fn, **hyperparameters)`` and stepped as ``step(inputs, targets)``, on the same classes.
"""

from __future__ import annotations

from ksd.optim.api import (
    KBFGS,
    KBFGSL,
    KFAC,
    KSD,
    LBFGS,
    LIBRARY,
    SGD,
    TRON,
    AdaGrad,
    Adam,
    ARCsLSR1,
    HessianFree,
    ModelOptimizer,
    NonlinearCG,
    RMSprop,
)
from ksd.optim.base import Diverged, Optimizer, OptimizerConfig, Stats
from ksd.optim.registry import OPTIMIZERS, available, build_optimizer, config_schema, optimizer_class

__all__ = [
    "KBFGS",
    "KBFGSL",
    "KFAC",
    "KSD",
    "LBFGS",
    "LIBRARY",
    "OPTIMIZERS",
    "SGD",
    "TRON",
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
    "config_schema",
    "optimizer_class",
]
