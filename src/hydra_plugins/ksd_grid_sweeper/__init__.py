"""Hydra sweeper with per-optimizer grids: ``hydra/sweeper=grid`` (the default of ``ksd-run``)."""
