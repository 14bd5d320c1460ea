"""Result files are written atomically: a run killed at any moment leaves complete files only."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksd.results import atomic_write


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "metrics.csv"
    atomic_write(path, lambda f: f.write("step,loss\n0,1.0\n"))

    def broken(f):
        f.write("step,loss\n0,1.0\n1,")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "step,loss\n0,1.0\n"
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone too


def check_complete(out: Path) -> int:
    """Parse every result file present; return the number of metric rows."""
    rows = 0
    if (out / "metrics.csv").exists():
        with open(out / "metrics.csv", newline="") as f:
            table = list(csv.reader(f))
        header, body = table[0], table[1:]
        assert all(len(row) == len(header) for row in body)
        assert [int(r[0]) for r in body] == sorted(int(r[0]) for r in body)
        rows = len(body)
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())
    if (out / "convergence.png").exists():
        assert (out / "convergence.png").read_bytes().startswith(b"\x89PNG")
    return rows


def test_killed_runs_leave_only_complete_files(tmp_path, data_root):
    rng = random.Random(0)
    seen_rows = []
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ksd.cli",
                f"hydra.run.dir={out}",
                "dataset=mnist",
                "optimizer=sgd",
                "model.widths=[32,8]",
                "dataset.train_size=2000",
                "dataset.test_size=200",
                "run.eval_every=1",
                "run.eval_train_size=200",
                "run.max_steps=100000",
                "run.max_seconds=null",
                "run.max_epochs=null",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"KSD_DATA": str(data_root), "PATH": "/usr/bin:/bin"},
        )
        time.sleep(rng.uniform(4.0, 9.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        seen_rows.append(check_complete(out))
    assert max(seen_rows) > 0  # at least one run was killed while writing rows, not before starting
