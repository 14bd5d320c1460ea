"""Result files of a run: ``metrics.csv``, ``summary.json`` and ``convergence.png``.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a run killed at any moment leaves either the previous complete file or the new
complete one, never a truncated file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically write ``data`` as indented JSON (NaN and infinities become null)."""
    atomic_write(path, lambda f: json.dump(_finite(data), f, indent=2, sort_keys=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


class MetricsWriter:
    """Keeps the rows of ``metrics.csv`` and rewrites the file atomically after each row.

    Columns are the union of the keys of all rows, in order of first appearance (optimizer
    statistics may appear after the first evaluation).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []

    def append(self, *rows: dict[str, Any]) -> None:
        """Add ``rows`` and rewrite the file once."""
        for row in rows:
            self.rows.append(row)
            self.columns += [k for k in row if k not in self.columns]
        atomic_write(self.path, self._write)


    def _write(self, f: io.IOBase) -> None:
        writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)


def plot_convergence(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training (and held-out) loss against epochs and against wall time, log scale, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, xkey, xlabel in ((axes[0], "epoch", "epochs"), (axes[1], "wall_time", "wall time [s]")):
        for key, style in (("train_loss", "-"), ("val_loss", "--"), ("test_loss", ":")):
            points = [(r[xkey], r[key]) for r in rows if _plottable(r.get(key))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    plt.close(fig)


def _plottable(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
