"""``ksd-run``: compose a configuration with Hydra and run it.

Bad input (a wrong value, a missing data file, a model that does not fit the data) ends the run
with one line on stderr and exit status 2. In a multirun sweep a job never stops the others: any
error is logged, the job records ``status: failed`` and the reason in its ``summary.json``, and the
sweep goes on. A job whose directory already holds a completed run of the same configuration
returns at once (``run.skip_completed``), so re-running a sweep only runs what is missing; in a
sweep, ``logger.group`` defaults to the sweep's name (one wandb group per sweep).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ksd.config import ConfigError
from ksd.data import DataError
from ksd.results import write_json

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("ksd")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> dict | None:
    from ksd.runner import execute

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.run.get("skip_completed", True) and (done := _completed_run(out_dir, cfg)) is not None:
        log.info("skipped: %s already holds a completed run of this configuration", out_dir)
        return done
    if multirun and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name
    try:
        return execute(cfg, out_dir)
    except (ConfigError, DataError) as err:
        print(f"ksd-run: error: {err}", file=sys.stderr)
        if multirun:
            log.error("job failed: %s", err)
            return None
        sys.exit(2)
    except Exception as err:
        if not multirun:
            raise
        log.exception("job failed")
        write_json(out_dir / "summary.json", {"status": "failed", "reason": f"{type(err).__name__}: {err}"})
        return None


def _completed_run(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The summary in ``out_dir`` if it is of a completed run whose result ``cfg`` would reproduce."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        current = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # no or unreadable summary, or a config that execute() will report properly
        return None
    if summary.get("status") != "completed":
        return None
    if _result_defining(summary.get("config") or {}) != _result_defining(current):
        log.info("re-running: the configuration differs from the completed run in %s", out_dir)
        return None
    return summary


def _result_defining(config: dict) -> dict:
    """What decides a run's result; not where the data lives, the device, the logger or the plots."""
    run = config.get("run") or {}
    budget = ("max_epochs", "max_steps", "max_seconds", "eval_every", "eval_train_size")
    return {
        "dataset": {k: v for k, v in (config.get("dataset") or {}).items() if k != "root"},
        "model": config.get("model"),
        "optimizer": config.get("optimizer"),
        "seed": config.get("seed"),
        "run": {k: run.get(k) for k in budget},
    }


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
