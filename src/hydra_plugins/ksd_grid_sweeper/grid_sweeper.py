"""The basic sweeper plus hyperparameters that depend on the value of one swept key.

Hydra's basic sweeper runs the Cartesian product of ``hydra.sweeper.params``. A comparison of
optimizers needs more: each optimizer has its own hyperparameters (SGD a learning rate, K-BFGS a
step length and a damping, KSD none) and the paper tuned each over its own grid. ``grids`` maps a
value of ``grid_key`` (``optimizer`` by default) to overrides in sweep syntax that are added to
every job with that value::

    hydra:
      sweeper:
        params: {optimizer: "sgd,adam,ksd", seed: "0,1,2"}
        grids:
          sgd: {optimizer.lr: "0.01,0.03,0.1"}                 # 3 settings × 3 seeds
          adam: {optimizer.lr: 1.0e-3, optimizer.beta2: 0.9}   # one fixed setting
          # ksd: no entry, its defaults

so the sweep is the union over optimizers of (common params × that optimizer's grid): 15 jobs here
instead of a product that would hand ``optimizer.lr`` to KSD. The added overrides become part of
the job's ``override_dirname``, hence of its output directory. A grid value in quotes with commas
is a sweep, a YAML list is one list value. A key given in ``params`` or on the command line is never
overridden by a grid (``optimizer.lr=0.05`` on the command line fixes it for every optimizer).
"""

from __future__ import annotations

import itertools
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


class GridSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        grids: dict[str, dict[str, Any]] | None = None,
        grid_key: str = "optimizer",
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = grids or {}
        self.grid_key = grid_key

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        jobs = grid_jobs(overrides, self.grids, self.grid_key)
        return [list(chunk) for chunk in _chunks(jobs, max_batch_size)]


def grid_jobs(overrides: list[Override], grids: dict[str, dict[str, Any]], grid_key: str) -> list[list[str]]:
    """The override list of every job: each job of the Cartesian product of ``overrides``, times the
    grid of its ``grid_key`` value (keys already in ``overrides`` left out)."""
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    given = {o.key_or_group for o in overrides}
    parser = OverridesParser.create()
    expanded: list[list[str]] = []
    for job in jobs:
        choice = next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == grid_key), None)
        grid = {k: v for k, v in (grids.get(choice) or {}).items() if k not in given}
        if not grid:
            expanded.append(job)
            continue
        grid_overrides = parser.parse_overrides([f"{k}={_as_override(v)}" for k, v in grid.items()])
        (settings,) = BasicSweeper.split_arguments(grid_overrides, None)
        expanded += [job + setting for setting in settings]
    return expanded


def _as_override(value: Any) -> str:
    """A grid value as override text: a string is taken as written (``"0.01,0.1"`` is a sweep), a YAML
    list is one list value (``[40, 80]`` → ``[40,80]``), numbers, booleans and null as Hydra spells them."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def _chunks(jobs: list[list[str]], size: int | None):
    if size is None or size <= 0:
        yield jobs
        return
    iterator = iter(jobs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
