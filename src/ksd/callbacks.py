"""Hydra callbacks of ``ksd-run``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable_reason(directory: Path) -> str | None:
    """Why ``directory`` cannot be created and written, or None if it can (it then exists)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


class OutputDirectoryCheck(Callback):
    """Refuse an output directory that cannot be written with one line, before Hydra tries to create it."""

    def _check(self, directory: str) -> None:
        reason = unwritable_reason(Path(directory).absolute())
        if reason is not None:
            print(
                f"ksd-run: error: cannot write results to {directory}: {reason}; "
                "set hydra.run.dir (or hydra.sweep.dir) to a writable folder.",
                file=sys.stderr,
            )
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
