"""``ksd-collect``: every run below some directories in one table, and the papers' model selection.

::

    ksd-collect multirun/kbfgs_mnist-cpu multirun/ksd_curves-cpu --out results/runs

writes ``results/runs.parquet`` and ``results/runs.csv`` (:func:`collect`: one row per evaluation of
every run) and ``results/runs_selected.csv`` (:func:`select`: per experiment and optimizer, the
selected hyperparameter setting and its final metrics averaged over seeds), and prints the selection
and every run that did not complete.

A run is a directory with a ``summary.json`` (completed, diverged, failed) or only a
``.hydra/config.yaml`` (started and never finished: status ``incomplete``). Its configuration is the
resolved one of ``summary.json``, else ``.hydra/config.yaml``. Every row carries

- ``experiment`` (``experiment.name``, else the name of the run's parent directory), ``scale``,
  ``optimizer``, ``dataset``, ``model``, ``seed``, ``status``, ``reason`` and ``run`` (its directory);
- ``setting``: the run's result-defining configuration apart from those columns and the seed, as
  JSON text, so runs that differ only in their seed share a setting;
- the columns of ``metrics.csv`` (``step``, ``epoch``, ``wall_time``, ``train_loss``, ...); a run
  without metrics has one row with these empty, so failures are in the table too;
- every configuration value as a column named by its dotted key (``optimizer.lr``, ``run.max_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

import ksd  # noqa: F401  registers ${by_scale:...} for configs read from .hydra/config.yaml
from ksd.results import atomic_write

#: Columns that identify a comparison: one line per optimizer in a figure of one experiment.
GROUP = ["experiment", "scale", "dataset", "model", "optimizer"]
#: Configuration keys that do not change a run's result (where data lives, logging, bookkeeping).
NOT_RESULT = (
    "seed",
    "device",
    "scale",
    "logger",
    "experiment",
    "dataset.root",
    "dataset.name",
    "model.name",
    "optimizer.name",
    "run.progress",
    "run.plot",
    "run.skip_completed",
    "run.max_chunk",
    "run.compile_curvature",
    "run.checkpoint_every",
    "run.eval_every",
    "run.eval_seconds",
    "run.eval_train_size",
)
#: Final metrics reported for a selected setting (those present in the table).
REPORTED = (
    "train_loss",
    "train_error",
    "val_loss",
    "val_error",
    "test_loss",
    "test_error",
    "test_accuracy",
    "test_perplexity",
)


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Every run directory below ``roots`` (a directory with summary.json or .hydra/config.yaml)."""
    runs: set[Path] = set()
    for root in map(Path, roots):
        runs.update(p.parent for p in root.rglob("summary.json"))
        runs.update(p.parent.parent for p in root.rglob(".hydra/config.yaml"))
    return sorted(runs)


def load_run(path: Path) -> pd.DataFrame:
    """The rows of one run: its evaluations with its identity, status and configuration columns."""
    path = Path(path)
    summary = _read_json(path / "summary.json")
    config = summary.get("config") or _read_config(path / ".hydra" / "config.yaml")
    flat = flatten(config)
    status = summary.get("status", "incomplete")
    metrics = _read_metrics(path / "metrics.csv")
    experiment = flat.get("experiment.name") or path.parent.name
    identity = {
        "experiment": experiment,
        "scale": flat.get("scale") if "experiment.name" in flat else None,
        "optimizer": flat.get("optimizer.name", summary.get("optimizer")),
        "dataset": flat.get("dataset.name", summary.get("dataset")),
        "model": flat.get("model.name", summary.get("model")),
        "seed": flat.get("seed", summary.get("seed")),
        "status": status,
        "reason": summary.get("reason")
        or ("no summary.json: still running or killed" if not summary else ""),
        "run": str(path),
        "setting": setting_of(flat),
    }
    rows = metrics if len(metrics) else pd.DataFrame(index=[0])
    columns = {**identity, **{k: v for k, v in flat.items() if k not in identity and k not in rows}}
    constant = pd.DataFrame({k: [v] * len(rows) for k, v in columns.items()}, index=rows.index)
    return pd.concat([rows, constant], axis=1)


def collect(roots: Iterable[Path]) -> pd.DataFrame:
    """One table of every run below ``roots``: a row per evaluation (see the module docstring)."""
    frames = [load_run(p) for p in find_runs(roots)]
    if not frames:
        return pd.DataFrame(columns=[*GROUP, "seed", "status", "reason", "run", "setting"])
    table = pd.concat(frames, ignore_index=True, sort=False)
    first = [*GROUP, "seed", "status", "reason", "run", "setting"]
    return table[first + [c for c in table.columns if c not in first]]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists become JSON text (one cell, one type)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, separators=(",", ":"))
        else:
            flat[name] = value
    return flat


def setting_of(flat: dict[str, Any]) -> str:
    """The result-defining configuration of a run, without its seed and identity, as JSON text."""
    keep = {
        k: v
        for k, v in flat.items()
        if k not in NOT_RESULT and not any(k.startswith(f"{p}.") for p in NOT_RESULT)
    }
    return json.dumps(dict(sorted(keep.items())), separators=(",", ":"))


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of every run (its only row when it has no metrics)."""
    if "step" in table:
        table = table.sort_values(["run", "step"], na_position="first", kind="stable")
    return table.groupby("run", sort=False).tail(1).reset_index(drop=True)


def higher_is_better(metric: str) -> bool:
    return metric.endswith("_accuracy")


def time_to_target(table: pd.DataFrame, metric: str, target: float) -> pd.Series:
    """Per run, the first training wall time at which ``metric`` reached ``target`` (NaN: never)."""
    if metric not in table or "wall_time" not in table:
        return pd.Series(dtype=float)
    values = table[metric].astype(float)
    reached = values >= target if higher_is_better(metric) else values <= target
    times = table["wall_time"].where(reached)
    return times.groupby(table["run"]).min()


def select(table: pd.DataFrame) -> pd.DataFrame:
    """Model selection as the papers did, one row per experiment, dataset, model and optimizer.

    Per hyperparameter setting, the final value of the experiment's ``experiment.select_on`` metric
    (default: ``val_loss`` where there is a validation split, else ``train_loss``) is averaged over
    the seeds; a diverged seed counts as the worst possible value, a failed or incomplete run is left
    out. The setting with the best average is selected and its final metrics are reported as mean
    and standard deviation (ddof=1) over its seeds that finished with finite values, with the time
    to reach ``experiment.target`` of the training metric (``experiment.train_metric``).
    """
    finals = final_rows(table)
    targets = _time_to_targets(table)
    out = []
    for key, group in finals.groupby(GROUP, dropna=False, sort=True):
        metric = first_value(group, "experiment.select_on") or (
            "val_loss" if _has(group, "val_loss") else "train_loss"
        )
        sign = -1.0 if higher_is_better(metric) else 1.0
        candidates = []
        for setting, runs in group.groupby("setting", sort=True):
            finished = runs[runs["status"].isin(["completed", "diverged"])]
            if finished.empty:
                continue
            values = pd.to_numeric(finished.get(metric), errors="coerce") if metric in finished else None
            if values is None:
                score = math.inf
            else:
                score = float(np.mean([sign * v if np.isfinite(v) else math.inf for v in values]))
            candidates.append((score, setting, runs))
        row: dict[str, Any] = dict(zip(GROUP, key))
        row.update(
            select_on=metric,
            settings=group["setting"].nunique(),
            runs=len(group),
            completed=int((group["status"] == "completed").sum()),
            diverged=int((group["status"] == "diverged").sum()),
            failed=int((~group["status"].isin(["completed", "diverged"])).sum()),
        )
        if candidates:
            score, setting, runs = min(candidates, key=lambda c: c[0])
            ok = runs[runs["status"] == "completed"]
            row.update(
                setting=setting,
                tuned=_tuned(setting, group["setting"].unique()),
                seeds=len(runs),
                selected_completed=len(ok),
                selection_score=sign * score,
            )
            for column in (*REPORTED, "wall_time", "epoch"):
                if column in ok:
                    values = pd.to_numeric(ok[column], errors="coerce")
                    values = values[np.isfinite(values)]
                    row[f"{column}_mean"] = values.mean() if len(values) else float("nan")
                    row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
            times = targets.reindex(runs["run"])
            row["target"] = first_value(group, "experiment.target")
            row["target_reached"] = int(times.notna().sum())
            row["time_to_target_mean"] = times.mean()
        out.append(row)
    return pd.DataFrame(out)


MERGE_BY = ("experiment", "scale", "optimizer")


def merge_tables(old: pd.DataFrame, new: pd.DataFrame, by: Sequence[str] = MERGE_BY) -> pd.DataFrame:
    """``new`` plus the rows of ``old`` whose ``by`` values ``new`` does not have. By (experiment, scale,
    optimizer), the default, a sweep of some optimizers replaces their runs and keeps the others' (a
    75-epoch K-FAC run beside new K-BFGS ones); by ``("run",)`` only the runs collected again are replaced
    (more seeds beside the committed ones)."""
    groups = list(by)
    replaced = new[groups].astype(str).drop_duplicates().apply(tuple, axis=1)
    keep = ~old[groups].astype(str).apply(tuple, axis=1).isin(set(replaced))
    return pd.concat([old[keep], new], ignore_index=True)


def write(table: pd.DataFrame, selection: pd.DataFrame, out: Path) -> list[Path]:
    """``out``.parquet and ``out``.csv of the table, ``out``_selected.csv of its selection (atomically)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(out.name + suffix) for suffix in (".parquet", ".csv", "_selected.csv")]
    atomic_write(paths[0], lambda f: _parquet_safe(table).to_parquet(f, index=False), binary=True)
    atomic_write(paths[1], lambda f: table.to_csv(f, index=False))
    atomic_write(paths[2], lambda f: selection.to_csv(f, index=False))
    return paths


def report(table: pd.DataFrame, selection: pd.DataFrame) -> str:
    """Text for the terminal: the selection, and every run that did not complete, with its reason."""
    lines = []
    if not selection.empty:
        cols = [
            c
            for c in [*GROUP, "tuned", "seeds", "completed", "diverged", "failed", "select_on"]
            if c in selection
        ]
        metric_cols = [
            c for c in selection.columns if c.endswith("_mean") and c.startswith(("train", "test"))
        ]
        lines.append(selection[cols + metric_cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    problems = final_rows(table)
    problems = problems[problems["status"] != "completed"]
    if not problems.empty:
        lines.append(f"\n{len(problems)} run(s) did not complete:")
        lines += [f"  {r.status:10s} {r.run}: {r.reason}" for r in problems.itertuples()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ksd-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories searched for runs (multirun/...)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/runs"),
        help="path stem of the outputs: STEM.parquet, STEM.csv, STEM_selected.csv (default results/runs)",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the runs already in STEM.parquet of every experiment, scale and optimizer not collected "
        "now (to add one sweep to the committed table without the others' run folders)",
    )
    parser.add_argument(
        "--add-runs",
        action="store_true",
        help="as --add, but replace only the runs collected again (the same run folder) and keep the other "
        "runs of the optimizers collected (more seeds beside the committed ones)",
    )
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(map(str, missing))}")
    table = collect(args.dirs)
    if table.empty:
        parser.error(f"no runs (summary.json or .hydra/config.yaml) below {', '.join(map(str, args.dirs))}")
    existing = args.out.with_name(args.out.name + ".parquet")
    if (args.add or args.add_runs) and existing.exists():
        by = ("run",) if args.add_runs else MERGE_BY
        table = merge_tables(pd.read_parquet(existing), table, by)
    selection = select(table)
    paths = write(table, selection, args.out)
    print(report(table, selection))
    print(f"\n{table['run'].nunique()} runs, {len(table)} rows -> {', '.join(map(str, paths))}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_config(path: Path) -> dict[str, Any]:
    """A run's composed config, resolved where possible (interpolations that cannot be stay as text)."""
    try:
        config = OmegaConf.load(path)
    except (OSError, ValueError):
        return {}
    try:
        return OmegaConf.to_container(config, resolve=True)
    except Exception:  # e.g. an environment variable of another machine
        return OmegaConf.to_container(config, resolve=False)


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].notna().any()


def first_value(frame: pd.DataFrame, column: str) -> Any:
    """The first non-missing value of ``column`` in ``frame`` (None when there is none)."""
    if column not in frame:
        return None
    values = frame[column].dropna()
    return values.iloc[0] if len(values) else None


def _tuned(setting: str, all_settings: Iterable[str]) -> str:
    """The ``key=value`` pairs of ``setting`` whose values differ between the settings of a group."""
    parsed = [json.loads(s) for s in all_settings]
    mine = json.loads(setting)
    varying = sorted(k for k in mine if len({json.dumps(s.get(k)) for s in parsed}) > 1)
    return " ".join(f"{k.removeprefix('optimizer.')}={mine[k]}" for k in varying)


def _time_to_targets(table: pd.DataFrame) -> pd.Series:
    """Per run, the time to its own experiment's target: ``experiment.target`` depends on the scale."""
    parts = []
    for _, runs in table.groupby(["experiment", "scale"], sort=False, dropna=False):
        metric = first_value(runs, "experiment.train_metric") or "train_loss"
        target = first_value(runs, "experiment.target")
        if target is not None and np.isfinite(float(target)):
            parts.append(time_to_target(runs, metric, float(target)))
    return pd.concat(parts) if parts else pd.Series(dtype=float)


def _parquet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding several Python types (a config value null in one run, a number in
    another is fine; text in one and a number in another is not) become text."""
    table = table.copy()
    for column in table.select_dtypes(include="object").columns:
        kinds = {type(v) for v in table[column].dropna()}
        if len(kinds) > 1:
            table[column] = table[column].map(lambda v: v if v is None or pd.isna(v) else str(v))
    return table


if __name__ == "__main__":
    main()
