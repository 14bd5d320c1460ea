"""``ksd-run``: compose a configuration with Hydra and run it.

Bad input (a wrong value, a missing data file, a model that does not fit the data) ends the run
with one line on stderr and exit status 2; in a multirun sweep the job records
``status: failed`` in its ``summary.json`` and the sweep goes on.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ksd.config import ConfigError
from ksd.data import DataError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("ksd")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> dict | None:
    from ksd.runner import execute

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return execute(cfg, out_dir)
    except (ConfigError, DataError) as err:
        print(f"ksd-run: error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("job failed: %s", err)
            return None
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
