"""Shared fixtures: the real data folder, composed configurations and tiny problems."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


# CI sets KSD_REQUIRE_SLURM=1 after starting the local cluster (.ci/run): there, a cluster test that finds
# no running cluster fails instead of skipping.
REQUIRE_SLURM = bool(os.environ.get("KSD_REQUIRE_SLURM"))
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"


def _cluster_up() -> bool:
    """Whether sinfo reaches a controller that has a node able to run jobs."""
    try:
        found = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    usable = re.search(r"^(idle|mixed|allocated|completing)$", found.stdout, re.MULTILINE)
    return found.returncode == 0 and usable is not None


def missing_slurm(reason: str) -> NoReturn:
    """Skip a cluster test for a missing cluster, or fail it when KSD_REQUIRE_SLURM is set."""
    if REQUIRE_SLURM:
        pytest.fail(f"{reason}; KSD_REQUIRE_SLURM is set, so a running cluster is required", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running SLURM cluster: the one sinfo finds, else the local one, started here with
    scripts/local_slurm.sh (idempotent, needs root; left running, `scripts/local_slurm.sh stop` ends it).
    Skips with the reason when there is none to be had, so that `make test` does not fail for the machine."""
    if shutil.which("sinfo") is None:
        missing_slurm("SLURM is not installed (`scripts/local_slurm.sh install` sets up a one-node cluster)")
    if _cluster_up():
        return
    if os.geteuid() != 0:
        missing_slurm("no SLURM cluster is running, and starting the local one needs root")
    started = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=180)
    if started.returncode != 0 or not _cluster_up():
        last = (started.stderr.strip().splitlines() or ["no output"])[-1]
        missing_slurm(f"no SLURM cluster is running, and `scripts/local_slurm.sh start` failed: {last}")


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
