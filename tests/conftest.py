"""Shared fixtures: the real data folder, composed configurations and tiny problems."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATA = Path(os.environ.get("KSD_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {DATA} (set KSD_DATA)")
    return DATA


def compose_config(*overrides: str) -> DictConfig:
    """The configuration `ksd-run OVERRIDES` would run."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
