"""``ksd-run``: compose a configuration with Hydra and run it.

Bad input (a wrong value, a missing data file, a model that does not fit the data) ends the run
with one line on stderr and exit status 2. In a multirun sweep a job never stops the others: any
error is logged, the job records ``status: failed`` and the reason in its ``summary.json``, and the
sweep goes on. A job whose directory already holds a completed run of the same configuration
returns at once (``run.skip_completed``), so re-running a sweep only runs what is missing; in a
sweep, ``logger.group`` defaults to the sweep's name (one wandb group per sweep).

Hydra's own reports of bad overrides (a misspelled or missing key, an unknown group option, a syntax
error) become one line of ours with exit status 2 as well, instead of Hydra's error block and its
HYDRA_FULL_ERROR hint (set HYDRA_FULL_ERROR=1 to get Hydra's traceback). A run that cannot write its
results (a full disk) says so in one line and exits with status 1, its previous complete files in
place; an output directory in use by another live run (:mod:`ksd.lock`) is refused with status 2
and left untouched.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ksd.config import RunConfig
from ksd.errors import ConfigError
from ksd.lock import OutputLocked, output_lock
from ksd.results import WriteError, write_json

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_BAD_INPUT = 2  # wrong key, type or value; missing data; output directory in use
EXIT_WRITE_FAILED = 1  # results could not be written (full disk, quota, I/O error)
log = logging.getLogger("ksd")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> dict | None:
    from ksd.data import DataError  # torch is imported here, not for --help or a misspelled override
    from ksd.runner import execute

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        with output_lock(out_dir):  # a job requeued while its earlier instance still runs stops here
            done = _completed_run(out_dir, cfg) if cfg.run.get("skip_completed", True) else None
    except (OutputLocked, WriteError) as err:
        return _refuse(err, multirun)
    if done is not None:
        log.info("skipped: %s already holds a completed run of this configuration", out_dir)
        return done
    if multirun and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name
    try:
        summary = execute(cfg, out_dir)
        if not multirun:
            print(closing_line(summary, out_dir), flush=True)
        return summary
    except (ConfigError, DataError, OutputLocked, WriteError) as err:
        return _refuse(err, multirun)
    except Exception as err:
        if not multirun:
            raise
        log.exception("job failed")
        try:
            with output_lock(out_dir):
                reason = f"{type(err).__name__}: {err}"
                write_json(out_dir / "summary.json", {"status": "failed", "reason": reason})
        except (OutputLocked, WriteError) as why:
            log.error("no summary.json recorded: %s", why)
        return None


def closing_line(summary: dict, out_dir: Path) -> str:
    """The last line of a single run: what it reached and where its files are."""
    final = summary.get("final") or {}
    losses = ", ".join(
        f"{name.replace('_', ' ')} {final[name]:.4g}" for name in ("train_loss", "test_loss") if name in final
    )
    status = summary.get("status", "?")
    why = f" ({summary['reason']})" if status != "completed" and summary.get("reason") else ""
    if summary.get("rewinds"):
        why += f" ({summary['rewinds']} rewinds)"
    try:
        where = out_dir.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        where = out_dir
    files = ", ".join(f for f in ("metrics.csv", "summary.json", "convergence.png") if (out_dir / f).exists())
    steps, epochs = summary.get("steps", 0), summary.get("epochs", 0.0)
    seconds = summary.get("wall_time", 0.0)
    return (
        f"ksd-run: {status}{why} after {steps} steps, {epochs:.2f} epochs, {seconds:.1f} s of training: "
        f"{losses or 'no evaluation'}; "
        f"files in {where}/ ({files})"
    )


def _refuse(err: Exception, multirun: bool) -> None:
    """Report ``err`` in one line; a single run exits, a sweep job returns so that the sweep goes on.

    Nothing is written here: input errors have recorded ``status: failed`` already (``execute``), a
    write error must not cost the previous complete files, and a locked directory belongs to another run.
    """
    print(f"ksd-run: error: {err}", file=sys.stderr)
    if multirun:
        log.error("job failed: %s", err)
        return None
    sys.exit(EXIT_WRITE_FAILED if isinstance(err, WriteError) else EXIT_BAD_INPUT)


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
    budget = ("max_epochs", "max_steps", "max_seconds", "eval_every", "eval_epochs", "eval_train_size")
    # settings added later: a run from before them had their defaults
    later = ("on_divergence", "rewind_loss_factor", "max_rewinds")
    divergence = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.name in later}
    return {
        "dataset": {k: v for k, v in (config.get("dataset") or {}).items() if k != "root"},
        "model": config.get("model"),
        "optimizer": config.get("optimizer"),
        "seed": config.get("seed"),
        "dtype": config.get("dtype", "float32"),
        "run": {k: run.get(k) for k in budget} | {k: run.get(k, v) for k, v in divergence.items()},
    }


def hydra_error_message(err: BaseException) -> tuple[str, int] | None:
    """One line (and the exit status) for an error Hydra would report itself, or None to let it.

    Hydra's messages for bad overrides span several lines and end in a HYDRA_FULL_ERROR hint; ours
    name the key and what would have been valid, in the style of :class:`ConfigError`.
    """
    if isinstance(err, WriteError):
        return str(err), EXIT_WRITE_FAILED
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):  # Hydra writing .hydra/
        where = err.filename or "the output directory"
        return f"cannot write {where}: {err.strerror} (the disk or quota is full).", EXIT_WRITE_FAILED
    if not isinstance(err, CompactHydraException):
        return None
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
        if found and err.options:
            group, option = found.groups()
            choices = ", ".join(err.options)
            message = f"{group}={option} is not an option; available options for {group}: {choices}."
            return message, EXIT_BAD_INPUT
        return first.rstrip(".") + ".", EXIT_BAD_INPUT
    if isinstance(err, OverrideParseException):
        url = re.search(r"https?://\S+", text)
        see = f" (see {url.group(0)})" if url else ""
        return f"cannot parse the overrides: {first}{see}.", EXIT_BAD_INPUT
    if (found := re.match(r"Could not override '([^']+)'", text)) and isinstance(
        err.__cause__, OmegaConfBaseException
    ):
        return _unknown_key(found.group(1), getattr(err.__cause__, "parent_node", None)), EXIT_BAD_INPUT
    if found := re.match(r"Could not delete from config\. '([^']+)' does not exist", text):
        key = found.group(1)
        parent_key, _, _ = key.rpartition(".")
        cfg = _overridden_config(err)
        parent = OmegaConf.select(cfg, parent_key) if cfg is not None and parent_key else cfg
        valid = _valid_keys(parent_key, parent)
        return f"cannot delete {key}: there is no such key{'; ' + valid if valid else ''}.", EXIT_BAD_INPUT
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines.append(str(cause).splitlines()[0])
    return "; ".join(line.rstrip(".") for line in lines) + ".", EXIT_BAD_INPUT


def _unknown_key(key: str, parent: Any) -> str:
    """``unknown key run.checkpoint_evry; valid keys under run: ...`` for an override of a missing key."""
    parent_key = parent._get_full_key(None) if isinstance(parent, DictConfig) else ""
    rest = key[len(parent_key) + 1 :] if parent_key else key
    unknown = f"{parent_key}.{rest.split('.')[0]}" if parent_key else rest.split(".")[0]
    if isinstance(parent, DictConfig) and not list(parent.keys()):
        return f"unknown key {key}; {parent_key} has no keys under it."
    valid = _valid_keys(parent_key, parent)
    return f"unknown key {unknown}{'; ' + valid if valid else ''}."


def _valid_keys(parent_key: str, parent: Any) -> str:
    if not isinstance(parent, DictConfig):
        return ""
    keys = ", ".join(str(k) for k in parent.keys())
    return f"valid keys under {parent_key}: {keys}" if parent_key else f"valid top-level keys: {keys}"


def _overridden_config(err: BaseException) -> DictConfig | None:
    """The config Hydra was applying overrides to when ``err`` was raised (its message lacks it)."""
    tb = err.__traceback__
    cfg = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_apply_overrides_to_config":
            cfg = tb.tb_frame.f_locals.get("cfg")
        tb = tb.tb_next
    return cfg if isinstance(cfg, DictConfig) else None


def _report_hydra_errors(run_and_report: Callable[[Callable[[], Any]], Any]) -> Callable:
    """Wrap Hydra's ``run_and_report`` so that the errors of :func:`hydra_error_message` end in one line."""

    def ours(func: Callable[[], Any]) -> Any:
        def reported() -> Any:
            try:
                return func()
            except Exception as err:
                found = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else hydra_error_message(err)
                if found is None:
                    raise
                print(f"ksd-run: error: {found[0]}", file=sys.stderr)
                sys.exit(found[1])

        return run_and_report(reported)

    ours.ksd_wrapped = True  # type: ignore[attr-defined]
    return ours


def main() -> None:
    """The ``ksd-run`` console script."""
    from hydra._internal import utils as hydra_utils  # where hydra.main looks run_and_report up

    if not getattr(hydra_utils.run_and_report, "ksd_wrapped", False):
        hydra_utils.run_and_report = _report_hydra_errors(hydra_utils.run_and_report)
    # A log line that cannot be written (the log file is on a full disk too) must not print logging's
    # "--- Logging error ---" traceback: the run reports its own failed writes in one line.
    logging.raiseExceptions = False
    _main()


if __name__ == "__main__":
    main()
