"""Result files are written atomically: a run killed at any moment leaves complete files only."""

from __future__ import annotations

import csv
import errno
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from ksd.results import WriteError, atomic_write, write_json
from ksd.runner import execute


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


@pytest.mark.slow  # kills runs at random points; the full-disk tests below stay in the fast set
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
        # kill while rows are being written: after the first row appears (start-up time varies with the
        # machine's load, so a fixed delay could kill before it), at a random moment within 3 s
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        seen_rows.append(check_complete(out))
    assert min(seen_rows) > 0  # every run was killed while writing rows, not before starting


# ---------------------------------------------------------------------------------------- a full disk
TINY_RUN = [
    "dataset=mnist",
    "optimizer=sgd",
    "model=mlp",
    "model.widths=[16]",
    "dataset.train_size=200",
    "dataset.val_size=100",
    "dataset.test_size=100",
    "run.max_steps=3",
    "run.max_epochs=null",
    "run.max_seconds=null",
    "run.eval_every=1",
    "run.eval_train_size=100",
    "run.checkpoint_every=1",
    "run.plot=false",
]


def full_disk(target: str, after: int) -> Callable[[int], None]:
    """``os.fsync`` that fails with ENOSPC for ``target``'s temporary files after ``after`` writes."""
    real_fsync, seen = os.fsync, [0]

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name.startswith(f".{target}.") and name.endswith(".tmp"):
            seen[0] += 1
            if seen[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    return fsync


#: `ksd-run` with ``os.fsync = full_disk(TARGET, AFTER)`` when ``KSD_TEST_FULL_DISK=TARGET:AFTER`` is set.
FULL_DISK_DRIVER = f"""
from __future__ import annotations
import errno, os
from collections.abc import Callable
from pathlib import Path

{inspect.getsource(full_disk)}
if "KSD_TEST_FULL_DISK" in os.environ:
    target, after = os.environ["KSD_TEST_FULL_DISK"].split(":")
    os.fsync = full_disk(target, int(after))
    import logging

    def flush(self):  # the run's log file is on the full disk too
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    logging.FileHandler.flush = flush
from ksd.cli import main
main()
"""


def test_full_disk_in_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "interrupted"})
    monkeypatch.setattr(os, "fsync", full_disk("summary.json", 0))
    with pytest.raises(WriteError, match=r"summary.json: No space left on device .*previous complete file"):
        write_json(path, {"status": "completed"})
    assert json.loads(path.read_text()) == {"status": "interrupted"}
    assert list(tmp_path.iterdir()) == [path]


def test_full_disk_while_writing_metrics_one_line_then_resume(tmp_path, data_root):
    """metrics.csv cannot be written at the third row: one line, exit status 1, the two complete rows
    and the checkpoint after them in place; the same command, with room again, resumes and completes."""
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK_DRIVER)
    env = {"KSD_DATA": str(data_root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(driver), f"hydra.run.dir={out}", *TINY_RUN]
    full = {**env, "KSD_TEST_FULL_DISK": "metrics.csv:2"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=full)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"ksd-run: error: cannot write {out / 'metrics.csv'}: No space left on device (the disk or quota is "
        "full); the previous complete file is kept."
    ], result.stderr
    assert check_complete(out) == 2 and not (out / "summary.json").exists()
    assert not list(out.glob(".*.tmp")) and not (out / ".ksd-run.lock").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["steps"] == 1

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in "".join(log.read_text() for log in out.glob("*.log"))
    # a single run ends with one line: what it reached and where its files are
    closing = result.stdout.strip().splitlines()[-1]
    assert closing.startswith("ksd-run: completed after 3 steps, ") and "train loss " in closing, closing
    assert closing.endswith(f"files in {out}/ (metrics.csv, summary.json)"), closing
    with open(out / "metrics.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize(("target", "after"), [("checkpoint.pt", 1), ("summary.json", 0)])
def test_full_disk_while_writing_a_checkpoint_or_the_summary(tmp_path, monkeypatch, data_root, target, after):
    """The run stops with WriteError; the previous checkpoint and summary are the complete ones from
    before, so that the same command resumes (the checkpoint is only removed after the summary)."""
    monkeypatch.setenv("KSD_DATA", str(data_root))
    out = tmp_path / "out"
    out.mkdir()
    write_json(out / "summary.json", {"status": "interrupted", "note": "an earlier attempt"})
    previous_summary = (out / "summary.json").read_bytes()
    monkeypatch.setattr(os, "fsync", full_disk(target, after))
    with pytest.raises(WriteError, match=f"cannot write .*{target}: No space left on device"):
        execute(compose_config(*TINY_RUN), out, progress=False)
    assert (out / "summary.json").read_bytes() == previous_summary
    assert not list(out.glob(".*.tmp")) and not (out / ".ksd-run.lock").exists()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    if target == "checkpoint.pt":  # the first checkpoint (after row 0) is kept; row 1 was written before
        assert state["steps"] == 0 and check_complete(out) == 2
    else:  # the run had finished: all rows are there, and the last checkpoint to resume from
        assert check_complete(out) == 4 and state["steps"] == 3
