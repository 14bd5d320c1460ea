"""Weights & Biases mirror of the metrics, offline unless an API key is configured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ksd.config import Settings
from ksd.errors import ConfigError


def _has_api_key() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())


class WandbLogger:
    """One wandb run per ksd run, grouped by ``logger.group`` (a sweep's name), config logged."""

    def __init__(self, settings: Settings, cfg: DictConfig, out_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb extra: pip install 'ksd-run[wandb]'.") from None
        c = settings.logger
        mode = c.mode or ("online" if _has_api_key() else "offline")
        name = f"{settings.optimizer.name}-{settings.model.name}-{settings.dataset.name}-s{settings.seed}"
        self.run = wandb.init(
            project=c.project,
            entity=c.entity,
            group=c.group,
            mode=mode,
            dir=str(out_dir),
            name=name,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="create_new",
        )

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(row, step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(
            {k: v for k, v in summary.items() if k in ("status", "steps", "epochs", "wall_time")}
        )
        self.run.finish()
