"""``make figures``: each paper's figure and table, redrawn from the collected results.

Reads the table of :mod:`ksd.collect` (``results/runs.parquet``) and writes, per experiment (and per
data set, when an experiment sweeps several):

- ``results/figures/<experiment>[_<dataset>].png`` and ``.pdf`` in the style of the papers' figures:
  the training metric on a log scale against training wall time and against epochs, and the test
  metric against epochs. Each optimizer is drawn with its selected setting (:func:`ksd.collect.select`):
  the mean over seeds as a line and the range over seeds as a band; the paper's reported values are
  dashed horizontal lines. An optimizer has the same colour in every figure (:data:`COLORS`). Another
  code's run of one of the methods on the same problem (``results/<source>_<figure name>.csv``,
  :func:`figure_curves`) is drawn dashed in that method's colour.
- a markdown table in ``results/README.md`` between :data:`BEGIN` and :data:`END` (text around the
  markers is kept): final training and test metric (mean ± std over seeds), time to reach the
  experiment's training target, and the paper's numbers beside ours; at ``scale=paper_epochs`` also the
  authors' per-epoch numbers (``results/authors_notebook.csv``) beside ours at the same epochs.

Everything comes from the table (each run's configuration holds its experiment's description), so a
fresh clone regenerates the figures from the committed ``results/runs.parquet`` alone.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ksd.collect import final_rows, first_value, higher_is_better, select
from ksd.results import atomic_write

COLORS = {
    "ksd": "#d62728",
    "hf": "#1f77b4",
    "lbfgs": "#7f7f7f",
    "sgd": "#2ca02c",
    "adam": "#ff7f0e",
    "kbfgs": "#9467bd",
    "kbfgs_l": "#8c564b",
    "kfac": "#17becf",
    "arcs_lsr1": "#e377c2",
    "ncg": "#bcbd22",
    "rmsprop": "#000000",
    "adagrad": "#393b79",
    "tron": "#006d6f",  # dark teal: HF's trust-region counterpart, near but distinct from HF's blue
}
LABELS = {
    "ksd": "KSD",
    "hf": "HF",
    "lbfgs": "L-BFGS",
    "sgd": "SGD-m",
    "adam": "Adam",
    "kbfgs": "K-BFGS",
    "kbfgs_l": "K-BFGS(L)",
    "kfac": "KFAC",
    "arcs_lsr1": "ARCs-LSR1",
    "ncg": "NCG",
    "rmsprop": "RMSprop",
    "adagrad": "AdaGrad",
    "tron": "TRON",
}
BEGIN = "<!-- BEGIN make figures: tables (generated; edit outside the markers) -->"
END = "<!-- END make figures: tables -->"
GRID_POINTS = 200


def color(optimizer: str) -> str:
    """The optimizer's colour: fixed for the project's optimizers, a stable hash colour otherwise."""
    if optimizer in COLORS:
        return COLORS[optimizer]
    import matplotlib

    palette = matplotlib.colormaps["tab20b"].colors
    return matplotlib.colors.to_hex(palette[zlib.crc32(optimizer.encode()) % len(palette)])


def label(optimizer: str) -> str:
    return LABELS.get(optimizer, optimizer)


def metric_label(metric: str) -> str:
    """``train_error`` → ``train error`` (squared reconstruction error or misclassification rate)."""
    return metric.replace("_", " ")


def seed_band(runs: Sequence[pd.DataFrame], x: str, y: str) -> tuple[np.ndarray, ...] | None:
    """Mean, minimum and maximum over runs of ``y`` against ``x``, each run linearly interpolated
    onto a common grid up to the smallest final ``x`` of the runs (where every run has a value)."""
    curves = []
    for run in runs:
        points = run[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
        points = points[np.isfinite(points[y])].sort_values(x)
        if len(points):
            curves.append((points[x].to_numpy(float), points[y].to_numpy(float)))
    if not curves:
        return None
    end = min(c[0][-1] for c in curves)
    if end <= 0 or any(len(c[0]) < 2 for c in curves):
        grid = np.array([min(c[0][0] for c in curves)])
    else:
        grid = np.linspace(0.0, end, GRID_POINTS)
    values = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
    return grid, values.mean(0), values.min(0), values.max(0)


def reported_values(rows: pd.DataFrame, dataset: str | None) -> dict[str, dict[str, float]]:
    """``experiment.reported`` of the runs' configs: {label: {metric: value}} for this data set."""
    found: dict[str, dict[str, Any]] = {}
    for column in rows.columns:
        match = re.fullmatch(r"experiment\.reported\.(.+)\.([^.]+)", column)
        if match and rows[column].notna().any():
            found.setdefault(match.group(1), {})[match.group(2)] = rows[column].dropna().iloc[0]
    return {
        name: {k: float(v) for k, v in values.items() if k != "dataset"}
        for name, values in found.items()
        if values.get("dataset") in (None, dataset)
    }


def experiment_info(rows: pd.DataFrame) -> dict[str, Any]:
    """The experiment's description from its runs' configs, with defaults for plain sweeps."""

    def first(key: str, default: Any) -> Any:
        value = first_value(rows, f"experiment.{key}")
        return default if value is None else value

    return {
        "paper": first("paper", ""),
        "figure": first("figure", ""),
        "train_metric": first("train_metric", "train_loss"),
        "test_metric": first("test_metric", "test_loss"),
        "target": first("target", None),
    }


def draw(
    rows: pd.DataFrame,
    selection: pd.DataFrame,
    info: dict[str, Any],
    reported: dict[str, dict[str, float]],
    title: str,
    path: Path,
    reference: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
) -> list[Path]:
    """One paper-style figure of the selected runs in ``rows``; writes ``path``.png and .pdf.

    ``info`` is :func:`experiment_info` of ``rows``, ``reported`` their :func:`reported_values`;
    ``reference`` (:func:`reference_curves`) draws the authors' per-epoch curves, dotted in the colour of
    the same method, in the panels against epochs, up to the last epoch of our runs. ``curves``
    (:func:`figure_curves`) draws other codes' runs of our methods, dashed in the method's colour, in every
    panel whose two columns they have (``wall_time``: the time panel), whole.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, test = info["train_metric"], info["test_metric"]
    panels = [
        ("wall_time", train, "training time [s]"),
        ("epoch", train, "epochs"),
        ("epoch", test, "epochs"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (x, y, xlabel) in zip(axes, panels):
        for choice in selection.itertuples():
            selected = rows[(rows["optimizer"] == choice.optimizer) & (rows["setting"] == choice.setting)]
            runs = [r for _, r in selected.groupby("run") if y in r and x in r]
            band = seed_band(runs, x, y)
            if band is None:
                continue
            grid, mean, low, high = band
            diverged = int((final_rows(selected)["status"] == "diverged").sum())
            text = label(choice.optimizer) + (f" ({diverged}/{len(runs)} diverged)" if diverged else "")
            ax.plot(grid, mean, color=color(choice.optimizer), label=text, lw=1.6)
            if len(runs) > 1:
                ax.fill_between(grid, low, high, color=color(choice.optimizer), alpha=0.18, lw=0)
        if reference is not None and x == "epoch" and y in reference:
            last = pd.to_numeric(rows["epoch"], errors="coerce").max()
            for optimizer in selection["optimizer"]:
                theirs = reference[(reference["method"] == label(optimizer)) & (reference["epoch"] <= last)]
                if not theirs.empty:
                    ax.plot(
                        theirs["epoch"],
                        theirs[y],
                        color=color(optimizer),
                        ls=":",
                        lw=1.6,
                        label=f"{label(optimizer)}, authors' notebook",
                    )
        drawn = draw_curves(ax, curves, selection["optimizer"], x, y)
        papers = [(name, values[y]) for name, values in reported.items() if y in values]
        for name, value in papers:
            ours = name in set(selection["optimizer"])
            ax.axhline(
                value,
                color=color(name) if ours else "black",
                ls="--",
                lw=1.0,
                label=f"{label(name)}, paper" if ours else name,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(y))
        if not higher_is_better(y):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax is axes[0] or papers or drawn or (reference is not None and x == "epoch"):
            ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=11)  # long titles wrap instead of running off the figure
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        out = path.with_suffix(suffix)
        # no creation date in the PDF: regenerating unchanged results leaves the files unchanged
        metadata = {"CreationDate": None} if suffix == ".pdf" else None

        def save(f: Any, kind: str = suffix[1:], metadata: dict | None = metadata) -> None:
            fig.savefig(f, format=kind, dpi=120, metadata=metadata)

        atomic_write(out, save, binary=True)
        written.append(out)
    plt.close(fig)
    return written


def markdown_table(
    selection: pd.DataFrame, info: dict[str, Any], reported: dict[str, dict[str, float]]
) -> str:
    """Final metrics of the selected settings, time to target and the paper's numbers, as markdown
    (``info`` and ``reported`` as for :func:`draw`)."""
    train, test = info["train_metric"], info["test_metric"]
    target = info["target"]
    reach = (
        f"time to {metric_label(train)} {'≥' if higher_is_better(train) else '≤'} {target:g}"
        if (target is not None and math.isfinite(float(target)))
        else "time to target"
    )
    header = [
        "optimizer",
        "selected setting",
        "runs ok/total",
        f"final {metric_label(train)}",
        f"final {metric_label(test)}",
        reach,
        "paper",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in selection.itertuples():
        paper = reported.get(s.optimizer, {})
        lines.append(
            "| "
            + " | ".join(
                [
                    label(s.optimizer),
                    getattr(s, "tuned", "") or "—",
                    f"{_count(getattr(s, 'selected_completed', 0))}/{_count(getattr(s, 'seeds', 0))}",
                    _mean_std(s, train),
                    _mean_std(s, test),
                    _time(s),
                    ", ".join(f"{metric_label(k)} {v:g}" for k, v in paper.items()) or "—",
                ]
            )
            + " |"
        )
    for name, values in reported.items():
        if name not in set(selection["optimizer"]):
            cells = [f"{values[m]:g}" if m in values else "—" for m in (train, test)]
            lines.append(f"| {name} (paper) | — | — | {cells[0]} | {cells[1]} | — | reported |")
    return "\n".join(lines)


def reference_curves(path: Path) -> pd.DataFrame | None:
    """Per-epoch numbers of a paper's own runs (CSV ``method, epoch, <metric>...``; ``#`` lines are notes)."""
    return pd.read_csv(path, comment="#") if path.exists() else None


def figure_curves(folder: Path, name: str) -> pd.DataFrame | None:
    """Other codes' runs on the problem of figure ``name`` (``<experiment>[_<dataset>][_<scale>]``, the
    figure's file name): every ``<source>_<name>.csv`` in ``folder``, e.g.
    ``ksd_reference_ksd_curves_cpu_long.csv`` (``scripts/ksd_reference.py curves``) or
    ``hf_martens_ksd_curves_cpu_long.csv``. Columns ``method`` (our optimizer's name or figure label, whose
    colour the curve takes), ``wall_time`` and/or ``epoch``, the metrics, optionally ``source`` (the
    legend's text; default: the file's ``<source>``); ``#`` lines are notes. None when there is none."""
    frames = []
    for path in sorted(folder.glob(f"*_{name}.csv")):
        frame = pd.read_csv(path, comment="#")
        if "method" in frame:
            if "source" not in frame:
                frame["source"] = path.stem[: -len(name) - 1]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def draw_curves(ax: Any, curves: pd.DataFrame | None, optimizers: Sequence[str], x: str, y: str) -> bool:
    """Draw on ``ax`` the ``curves`` (:func:`figure_curves`) of ``optimizers`` that have ``x`` and ``y``,
    dashed in each optimizer's colour; whether any was drawn."""
    if curves is None or x not in curves or y not in curves:
        return False
    drawn = False
    for optimizer in optimizers:
        theirs = curves[curves["method"].isin([optimizer, label(optimizer)])]
        for source, run in theirs.groupby("source", sort=True):
            points = run[[x, y]].apply(pd.to_numeric, errors="coerce").dropna().sort_values(x)
            if len(points):
                ax.plot(
                    points[x],
                    points[y],
                    color=color(optimizer),
                    ls="--",
                    lw=1.6,
                    label=f"{label(optimizer)}, {source}",
                )
                drawn = True
    return drawn


def epoch_table(rows: pd.DataFrame, reference: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Markdown: the reference's values at a few epochs beside ours (mean over the runs that evaluated
    that epoch, with their count), for each optimizer whose label is a reference ``method``."""
    ours = rows[rows["optimizer"].map(label).isin(set(reference["method"]))]
    if ours.empty or "epoch" not in ours:
        return ""
    epochs = sorted(set(reference["epoch"]) & {1, 2, 3, 5, 10, 20, 30, 40, 50, 62, 75})
    header = ["method", "epoch", *(f"{metric_label(m)}: theirs / ours (runs)" for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for optimizer, runs in ours.groupby("optimizer", sort=True):
        theirs = reference[reference["method"] == label(optimizer)].set_index("epoch")
        for epoch in epochs:
            at = runs[np.isclose(pd.to_numeric(runs["epoch"], errors="coerce"), epoch)]
            if epoch not in theirs.index or at.empty:
                continue
            cells = []
            for metric in metrics:
                values = pd.to_numeric(at[metric], errors="coerce")
                values = values[np.isfinite(values)]
                mine = f"{values.mean():.4g} ({len(values)})" if len(values) else "— (0)"
                cells.append(f"{theirs.at[epoch, metric]:.4g} / {mine}")
            lines.append(f"| {label(optimizer)} | {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render(
    table: pd.DataFrame,
    figures_dir: Path,
    reference: pd.DataFrame | None = None,
    curves_dir: Path | None = None,
) -> tuple[list[Path], str]:
    """Every figure of the table into ``figures_dir``; returns the files and the markdown section.

    ``reference`` (:func:`reference_curves`) adds a per-epoch table to the sections at ``scale=paper_epochs``;
    ``curves_dir`` holds other codes' runs (:func:`figure_curves`) to draw into the figures.
    """
    selection = select(table)
    written: list[Path] = []
    sections = []
    for (experiment, scale), rows in table.groupby(["experiment", "scale"], dropna=False, sort=True):
        datasets = sorted(rows["dataset"].dropna().unique())
        for dataset in datasets:
            part = rows[rows["dataset"] == dataset]
            chosen = selection[
                (selection["experiment"] == experiment)
                & (selection["dataset"] == dataset)
                & (selection["scale"].fillna("") == ("" if pd.isna(scale) else scale))
                & selection["setting"].notna()
            ]
            if chosen.empty:
                continue
            info, reported = experiment_info(part), reported_values(part, dataset)
            name = experiment if len(datasets) == 1 else f"{experiment}_{dataset}"
            if not pd.isna(scale) and scale != "cpu":  # one figure per scale; the cpu set keeps plain names
                name = f"{name}_{scale}"
            scale_text = "" if pd.isna(scale) else f", scale={scale}"
            title = f"{info['paper']}: {info['figure']}" if info["paper"] else name
            if len(datasets) > 1:
                title += f" [{dataset}]"
            at_epochs = reference if scale == "paper_epochs" else None
            curves = figure_curves(curves_dir, name) if curves_dir is not None else None
            written += draw(
                part, chosen, info, reported, f"{title}{scale_text}", figures_dir / name, at_epochs, curves
            )
            per_epoch = ""
            if at_epochs is not None:
                per_epoch = epoch_table(part, at_epochs, [info["train_metric"], info["test_metric"]])
            if per_epoch:
                intro = "Per epoch, the authors' runs (`results/authors_notebook.csv`) beside ours:"
                per_epoch = f"\n{intro}\n\n{per_epoch}\n"
            sections.append(
                f"### {name}{scale_text}\n\n{info['paper']}: {info['figure']}\n\n"
                f"![{name}](figures/{name}.png)\n\n{markdown_table(chosen, info, reported)}\n{per_epoch}"
            )
    return written, "\n".join(sections)


def update_readme(readme: Path, section: str) -> None:
    """Put ``section`` between the markers of ``readme`` (appended with the markers if absent)."""
    text = readme.read_text() if readme.exists() else "# Results\n\n"
    block = f"{BEGIN}\n\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(readme, lambda f: f.write(text))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make figures", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="folder with runs.parquet; figures/ and README.md are written there",
    )
    args = parser.parse_args(argv)
    table_path = args.results / "runs.parquet"
    if not table_path.exists():
        parser.error(
            f"{table_path} not found; collect runs first: ksd-collect multirun/... --out {args.results}/runs"
        )
    table = pd.read_parquet(table_path)
    reference = reference_curves(args.results / "authors_notebook.csv")
    written, section = render(table, args.results / "figures", reference, args.results)
    update_readme(args.results / "README.md", section)
    print(f"{len(written)} files in {args.results / 'figures'}; tables in {args.results / 'README.md'}")


def _mean_std(row: Any, metric: str) -> str:
    mean, std = getattr(row, f"{metric}_mean", float("nan")), getattr(row, f"{metric}_std", float("nan"))
    if not isinstance(mean, float) or not math.isfinite(mean):
        return "—"
    return f"{mean:.4g} ± {std:.2g}" if math.isfinite(std) else f"{mean:.4g}"


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


def _time(row: Any) -> str:
    seeds = _count(getattr(row, "seeds", 0))
    reached = _count(getattr(row, "target_reached", 0))
    mean = getattr(row, "time_to_target_mean", float("nan"))
    if not reached or not math.isfinite(mean):
        return f"not reached (0/{seeds})" if getattr(row, "target", None) is not None else "—"
    return f"{mean:.1f} s ({reached}/{seeds})"
