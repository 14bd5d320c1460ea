"""The optimizers by ``optimizer.name``: :data:`OPTIMIZERS` maps each to ``module:Class``.

Modules are imported only when used, so one optimizer's dependencies never slow the others down. Both
``ksd-run`` (through the runner) and the library API (:mod:`ksd.optim.api`) find their classes here; the
package :mod:`ksd.optim` re-exports it all.
"""

from __future__ import annotations

import importlib
import importlib.util

from ksd.errors import ConfigError
from ksd.optim.base import Optimizer, OptimizerConfig
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
    "tron": "ksd.optim.tron:TRON",
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


def config_schema(name: str) -> type[OptimizerConfig]:
    """The ``Config`` dataclass of the optimizer ``name``: the schema ``config.validate`` merges
    the ``optimizer`` node into (handed to it by the runner)."""
    return optimizer_class(name).Config


def build_optimizer(config: OptimizerConfig, problem: Problem) -> Optimizer:
    """The optimizer described by a validated config, bound to ``problem``."""
    return optimizer_class(config.name)(problem, config)
