"""One run, from a composed configuration to the files in its output directory.

``execute`` is what ``ksd-run`` calls inside Hydra, and what tests call directly:

    validate config → load data → build model, problem, optimizer → engine.train → results
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ksd import data, engine, models, optim
from ksd.config import Registries, Settings, validate
from ksd.data import DataError, load_dataset
from ksd.errors import ConfigError
from ksd.lock import output_lock, release
from ksd.logging import build_loggers
from ksd.models import build_model
from ksd.optim import build_optimizer
from ksd.problem import Problem
from ksd.results import WriteError, atomic_write, plot_convergence, write_json

log = logging.getLogger("ksd")

#: What config.validate needs from the registries, which check their own nodes; config imports none of them.
REGISTRIES = Registries(dataset=data.check_node, model=models.check_node, optimizer=optim.config_schema)


class RunError(Exception):
    """A run that cannot start; the message is one sentence for the user."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} was requested but CUDA is not available here; use device=cpu or auto."
        )
    return torch.device(name)


def prepare(settings: Settings) -> tuple[Problem, Any, list[str]]:
    """Data, model, problem and optimizer of a validated configuration, plus lines to log."""
    device = resolve_device(settings.device)
    d = settings.dataset
    splits = load_dataset(
        d.name,
        d.root,
        val_size=d.val_size,
        train_size=d.train_size,
        test_size=d.test_size,
        seed=0,
        device=device,
        path=d.path,
        seq_len=d.seq_len,
        torchvision=d.torchvision,
        download=d.download,
    )
    batch_size = getattr(settings.optimizer, "batch_size", None)
    if batch_size is not None and batch_size > len(splits.train):
        raise ConfigError(
            f"optimizer.batch_size={batch_size} is larger than the {len(splits.train)} training examples; "
            "lower it or set it to null for full-batch training."
        )
    dtype = getattr(torch, settings.dtype)
    splits = splits.to_float(dtype)
    torch.manual_seed(settings.seed)
    built = build_model(settings.model, splits.spec)
    augment = None
    if d.augment:
        from ksd.data.cifar10 import augment_cifar

        augment = augment_cifar
    problem = Problem(
        built.network.to(device, dtype),
        built.loss,
        splits,
        autoencoder=built.autoencoder,
        seed=settings.seed,
        max_chunk=settings.run.max_chunk,
        augment=augment,
        compile_curvature=settings.run.compile_curvature,
    )
    optimizer = build_optimizer(settings.optimizer, problem)
    lines = [
        f"data: {splits.spec.source}; train {len(splits.train)}, val {len(splits.val)}, "
        f"test {len(splits.test)}",
        *splits.notes,
        f"model: {built.description}",
        f"optimizer: {settings.optimizer}",
        f"device: {device}, {settings.dtype}",
    ]
    return problem, optimizer, lines


def execute(cfg: DictConfig, out_dir: Path, *, progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment of ``cfg`` into ``out_dir`` and return its summary.

    Raises :class:`ConfigError` or :class:`~ksd.data.DataError` for unusable input (nothing but a
    ``summary.json`` with ``status: failed`` is left behind), :class:`~ksd.lock.OutputLocked` when
    another live run holds ``out_dir`` (nothing is written), and :class:`~ksd.results.WriteError` when a
    result file or the checkpoint cannot be written (a full disk: every file keeps its previous
    complete version, and the same command resumes from the last checkpoint once there is room).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError.of(out_dir, err) from err
    with output_lock(out_dir) as lock_path:
        summary, stop_signal = _execute(cfg, out_dir, progress)
        if stop_signal is not None:  # hand the signal on, e.g. to submitit, which requeues the job;
            release(lock_path, every_hold=True)  # the process may end there, its files are complete
            signal.raise_signal(stop_signal)
    return summary


def _execute(cfg: DictConfig, out_dir: Path, progress: bool | None) -> tuple[dict[str, Any], int | None]:
    """The body of :func:`execute`, under the output directory's lock; returns the summary and the stop
    signal to hand on."""
    summary: dict[str, Any] = {
        "status": "failed",
        "optimizer": cfg.get("optimizer", {}).get("name"),
        "dataset": cfg.get("dataset", {}).get("name"),
        "model": cfg.get("model", {}).get("name"),
        "seed": cfg.get("seed"),
    }
    try:
        settings = validate(cfg, REGISTRIES)
        problem, optimizer, lines = prepare(settings)
    except (ConfigError, DataError) as err:
        summary["reason"] = str(err)
        write_json(out_dir / "summary.json", summary)
        raise
    for line in lines:
        log.info(line)
    checkpoint_path = out_dir / "checkpoint.pt"
    resumed = _load_checkpoint(checkpoint_path, cfg)
    loggers = build_loggers(settings, cfg, out_dir, resumed["rows"] if resumed else ())
    show = progress if progress is not None else settings.run.progress
    if show is None:
        show = sys.stderr.isatty()
    trainer = engine.Trainer(
        problem,
        optimizer,
        settings.run,
        lambda row: [lg.log(row) for lg in loggers],
        checkpoint=lambda state: _save_checkpoint(checkpoint_path, state, cfg),
        progress=show,
    )
    if resumed:
        trainer.load_state_dict(resumed)
        log.info("resumed from %s at step %d", checkpoint_path, resumed["steps"])
    outcome = trainer.run()
    final = outcome.rows[-1] if outcome.rows else {}
    summary.update(
        status=outcome.status,
        reason=outcome.reason,
        steps=outcome.steps,
        epochs=outcome.epochs,
        wall_time=outcome.wall_time,
        rewinds=outcome.rewinds,
        n_params=problem.n_params,
        data_source=problem.splits.spec.source,
        notes=lines,
        final={k: v for k, v in final.items() if k not in ("step", "epoch", "wall_time")},
        best=_best(outcome.rows),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if settings.run.plot and outcome.rows:  # before the summary, which marks the run as done
        s = settings
        title = f"{s.optimizer.name} · {s.model.name} · {s.dataset.name} · seed {s.seed}"
        plot_convergence(outcome.rows, out_dir / "convergence.png", title)
    write_json(out_dir / "summary.json", summary)
    if outcome.status != "interrupted":  # only once the summary is written: a failed write can resume
        checkpoint_path.unlink(missing_ok=True)
    for lg in loggers:
        lg.finish(summary)
    log.info(
        "%s after %d steps, %.2f epochs, %.1f s: train loss %.4g, test loss %s",
        outcome.status,
        outcome.steps,
        outcome.epochs,
        outcome.wall_time,
        final.get("train_loss", float("nan")),
        f"{final['test_loss']:.4g}" if "test_loss" in final else "n/a",
    )
    return summary, outcome.signal


def _comparable(cfg: DictConfig) -> dict[str, Any]:
    """The parts of a configuration a checkpoint must agree on (the budget may be extended)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container.get(k) for k in ("dataset", "model", "optimizer", "seed")}


def _save_checkpoint(path: Path, state: dict[str, Any], cfg: DictConfig) -> None:
    state = {**state, "config": _comparable(cfg)}
    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def _load_checkpoint(path: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint left in ``path`` by an interrupted run of the same configuration, if any."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint is written atomically, so this is a foreign or damaged file
        raise ConfigError(f"cannot read the checkpoint {path} ({err}); delete it to start afresh.") from None
    if state.get("config") != _comparable(cfg):
        raise ConfigError(
            f"{path} belongs to a run with another dataset, model, optimizer or seed; "
            "use another output directory or delete the checkpoint."
        )
    return state


def _best(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Best value of each loss/error (minimum) and accuracy (maximum) over the evaluations."""
    best: dict[str, float] = {}
    for key in {k for r in rows for k in r if k.endswith(("_loss", "_error", "_accuracy"))}:
        values = [r[key] for r in rows if isinstance(r.get(key), float)]
        if values:
            best[key] = max(values) if key.endswith("_accuracy") else min(values)
    return best
