"""``scale=cpu|paper``: one experiment config, two sizes.

An experiment config (``conf/experiment/*.yaml``) writes every size-dependent value as
``${by_scale:CPU_VALUE,PAPER_VALUE}``; the root key ``scale`` (``cpu`` by default, ``scale=paper``
on the command line) picks one when the value is read::

    dataset:
      train_size: ${by_scale:2000,null}   # 2,000 examples on a laptop, the full set for the paper
    run:
      max_seconds: ${by_scale:30,500}

The resolver is registered when :mod:`ksd` is imported, so Hydra (``ksd-run``), launcher workers
that unpickle a job, ``hydra.compose`` in tests and :mod:`ksd.collect` all resolve the same values.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

SCALES = ("cpu", "paper")


def by_scale(cpu: Any, paper: Any, *, _root_: Any) -> Any:
    """``cpu`` or ``paper``, after the root key ``scale``."""
    if "scale" not in _root_:
        raise ValueError("${by_scale:...} needs the root key `scale` (conf/config.yaml).")
    scale = _root_.scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}.")
    return cpu if scale == "cpu" else paper


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("by_scale"):
        OmegaConf.register_new_resolver("by_scale", by_scale)


register_resolvers()
