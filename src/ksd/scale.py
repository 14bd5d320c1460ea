"""``scale=cpu|cpu_long|paper|paper_epochs``: one experiment config, four sizes.

An experiment config (``conf/experiment/*.yaml``) writes every size-dependent value as
``${by_scale:CPU_VALUE,PAPER_VALUE}``; the root key ``scale`` (``cpu`` by default, ``scale=paper``
on the command line) picks one when the value is read::

    dataset:
      train_size: ${by_scale:2000,null}   # 2,000 examples on a laptop, the full set for the paper
    run:
      max_seconds: ${by_scale:30,500}

A third value, ``${by_scale:CPU,PAPER,PAPER_EPOCHS}``, is taken at ``scale=paper_epochs``: the papers'
data sizes and settings with the papers' *epoch counts* instead of their (GPU) time budgets, so that a
CPU, slower per step, trains as far as the paper did. Without a third value ``paper_epochs`` takes
``PAPER``::

    run:
      max_seconds: ${by_scale:20,500,null}   # no time limit at scale=paper_epochs
      max_epochs: ${by_scale:null,null,62}

A fourth value, ``${by_scale:CPU,PAPER,PAPER_EPOCHS,CPU_LONG}``, is taken at ``scale=cpu_long``: budgets
of tens of minutes per run on the same CPU, long enough for the batch methods to leave the early
plateaus the 20-second ``cpu`` set ends on. Without a fourth value ``cpu_long`` takes ``CPU``, so an
experiment only spells out what the long runs change::

    run:
      max_seconds: ${by_scale:20,3600,3600,720}   # 12 minutes per run at scale=cpu_long

The resolver is registered when :mod:`ksd` is imported, so Hydra (``ksd-run``), launcher workers
that unpickle a job, ``hydra.compose`` in tests and :mod:`ksd.collect` all resolve the same values.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

SCALES = ("cpu", "cpu_long", "paper", "paper_epochs")
_UNSET = object()


def by_scale(cpu: Any, paper: Any, paper_epochs: Any = _UNSET, cpu_long: Any = _UNSET, *, _root_: Any) -> Any:
    """``cpu``, ``paper``, ``paper_epochs`` (default: ``paper``) or ``cpu_long`` (default: ``cpu``), after
    the root key ``scale``."""
    if "scale" not in _root_:
        raise ValueError("${by_scale:...} needs the root key `scale` (conf/config.yaml).")
    scale = _root_.scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}.")
    if scale == "cpu":
        return cpu
    if scale == "cpu_long":
        return cpu if cpu_long is _UNSET else cpu_long
    if scale == "paper_epochs" and paper_epochs is not _UNSET:
        return paper_epochs
    return paper


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("by_scale"):
        OmegaConf.register_new_resolver("by_scale", by_scale)


register_resolvers()
