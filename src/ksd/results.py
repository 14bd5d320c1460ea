"""Result files of a run: ``metrics.csv``, ``summary.json`` and ``convergence.png``.

Every file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a run killed at any moment leaves either the previous complete file or the new
complete one, never a truncated file. A write that fails (a full disk, a quota, an I/O error) leaves
the previous complete file too, and raises :class:`WriteError`, whose message is one sentence.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """A result file could not be written; the previous complete version (if any) is still in place.

    ``str()`` is the one-sentence message (``errno`` and ``filename`` are those of the failed write).
    """

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    @classmethod
    def of(cls, path: Path, err: OSError) -> WriteError:
        """The error for ``path`` caused by ``err``."""
        reason = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason += " (the disk or quota is full)"
        kept = "the previous complete file is kept" if Path(path).exists() else "nothing was written"
        return cls(err.errno, f"cannot write {path}: {reason}; {kept}.", str(path))


def atomic_write(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` atomically (temporary file + fsync + rename).

    Raises :class:`WriteError` for an operating-system error (ENOSPC is the usual one: it surfaces in
    ``write``, ``flush`` or ``fsync``), after removing the temporary file, so that a full disk never
    costs the previous complete file.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        os_error = _os_error(err) if isinstance(err, Exception) else None  # not KeyboardInterrupt
        if os_error is not None:
            raise WriteError.of(path, os_error) from err
        raise


def _os_error(err: BaseException) -> OSError | None:
    """The operating-system error behind ``err``: itself, or one it was raised from or while handling
    (``torch.save`` turns a failed ``write`` into a RuntimeError raised during the OSError)."""
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 5:
        if isinstance(current, WriteError):
            return None
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


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
