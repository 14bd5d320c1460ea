"""Metrics loggers: ``metrics.csv`` always, Weights & Biases with ``logger=wandb``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from ksd.config import Settings
from ksd.results import MetricsWriter


class Logger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class CSVLogger:
    """Writes each evaluation row to ``metrics.csv`` (atomically rewritten)."""

    def __init__(self, out_dir: Path, previous_rows: list[dict[str, Any]] = ()) -> None:
        self.writer = MetricsWriter(Path(out_dir) / "metrics.csv")
        if previous_rows:  # a resumed run rewrites the rows of its checkpoint first
            self.writer.append(*previous_rows)

    def log(self, row: dict[str, Any]) -> None:
        self.writer.append(row)

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def build_loggers(
    settings: Settings, cfg: DictConfig, out_dir: Path, previous_rows: list[dict[str, Any]] = ()
) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(out_dir, previous_rows)]
    if settings.logger.name == "wandb":
        from ksd.logging.wandb import WandbLogger

        loggers.append(WandbLogger(settings, cfg, out_dir))
    return loggers
