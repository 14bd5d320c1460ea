"""Shared fixtures: the real data folder, composed configurations and tiny problems."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _data_root() -> Path:
    """The real data folder: ``$KSD_DATA`` if set (non-empty), else ``<repo>/../shared/data``."""
    env = os.environ.get("KSD_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


DATA = _data_root()
# CI sets KSD_REQUIRE_DATA=1 (.ci/run): there, missing real data fails the tests instead of skipping them.
REQUIRE_DATA = bool(os.environ.get("KSD_REQUIRE_DATA"))


def missing_data(reason: str) -> NoReturn:
    """Skip the test for missing real data, or fail it when KSD_REQUIRE_DATA is set."""
    if REQUIRE_DATA:
        pytest.fail(f"{reason}; KSD_REQUIRE_DATA is set, so the real data is required", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "MNIST" / "raw").is_dir():
        missing_data(f"real data not found at {DATA} (set KSD_DATA)")
    return DATA


def compose_config(*overrides: str) -> DictConfig:
    """The configuration `ksd-run OVERRIDES` would run."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
