"""Hydra callbacks of ``ksd-run``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ksd import lock
from ksd.results import WriteError


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


class OutputDirectoryLock(Callback):
    """Take the output directory's lock (:mod:`ksd.lock`) of a single run before Hydra writes into it.

    Hydra writes ``.hydra/`` and the log before the task starts; taking the lock here means that a
    second run pointed at a directory in use refuses before it has changed a single file there. Sweep
    jobs take theirs in ``ksd-run``'s task function (a job's directory is known only there).
    """

    def __init__(self) -> None:
        self._path: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._path = lock.acquire(Path(config.hydra.run.dir))
        except (lock.OutputLocked, WriteError) as err:
            print(f"ksd-run: error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, lock.OutputLocked) else 1)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._path is not None:
            lock.release(self._path)
            self._path = None
