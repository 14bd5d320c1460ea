"""One run per output directory: the lock file, its stale takeover, and two `ksd-run`s at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ksd import lock
from ksd.lock import LOCK_NAME, OutputLocked, acquire, output_lock, release

KSD_RUN = str(Path(sys.executable).with_name("ksd-run"))
#: A process that takes the lock of argv[1], says so on stdout, then waits to be killed.
HOLDER = (
    "import sys, time; from ksd.lock import acquire; "
    "acquire(sys.argv[1]); print('held', flush=True); time.sleep(99)"
)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def holder(tmp_path):
    """Another live process holding the lock of tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield out, process
    finally:
        process.kill()
        process.wait()


def test_lock_holds_pid_and_host_and_is_reentrant(tmp_path):
    path = acquire(tmp_path)
    content = json.loads(path.read_text())
    assert (content["pid"], content["host"]) == (os.getpid(), socket.gethostname())
    assert acquire(tmp_path) == path  # the same process again: counted, not refused
    release(path)
    assert path.exists()
    release(path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_live_holder_is_refused_by_name(holder):
    out, process = holder
    with pytest.raises(OutputLocked) as refused:
        acquire(out)
    message = str(refused.value)
    assert f"is in use by another run (pid {process.pid} on host {socket.gethostname()} since " in message
    assert str(out / LOCK_NAME) in message and "\n" not in message
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == process.pid  # untouched


def test_a_stale_lock_is_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": 0}))
    with output_lock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The pid is alive but belongs to a process started after the holder (its start time differs)."""
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "1"}))
    with output_lock(tmp_path):
        assert json.loads(path.read_text())["started"] == lock._start_time(os.getpid())


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": dead_pid(), "host": "another-node", "since": time.time()}))
    with pytest.raises(OutputLocked, match="on host another-node"):
        acquire(tmp_path)
    assert json.loads(path.read_text())["host"] == "another-node"


def test_a_lock_taken_over_meanwhile_is_not_removed_by_the_old_holder(tmp_path):
    path = acquire(tmp_path)
    path.write_text(json.dumps({"pid": 1, "host": "another-node"}))  # what a takeover would leave
    release(path)
    assert json.loads(path.read_text())["host"] == "another-node"


def test_second_run_in_the_same_directory_refuses_and_changes_nothing(holder):
    """`ksd-run` pointed at a directory in use: one line, exit status 2, before Hydra writes there."""
    out, process = holder
    (out / "metrics.csv").write_text("step,train_loss\n0,1.0\n")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = subprocess.run(
        [KSD_RUN, f"hydra.run.dir={out}", "run.max_steps=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "KSD_DATA": str(out / "no-data")},
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    holder_text = f"pid {process.pid} on host {socket.gethostname()} since "
    assert line.startswith(f"ksd-run: error: {out} is in use by another run ({holder_text}")
    assert line.endswith(f"choose another output directory (if that run is gone, delete {out / LOCK_NAME}).")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # no .hydra/, no log


def test_execute_refuses_a_directory_in_use(holder):
    from conftest import compose_config

    from ksd.runner import execute

    out, _ = holder
    with pytest.raises(OutputLocked):
        execute(compose_config("run.max_steps=1"), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
