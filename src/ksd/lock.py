"""One run per output directory: a lock file that holds the holder's pid and host.

Two runs writing into one directory would interleave their ``metrics.csv`` rows and overwrite each
other's checkpoints; a sweep job that is requeued while its earlier instance still writes would do the
same. So a run takes ``<out_dir>/.ksd-run.lock`` (created with ``O_EXCL``, so exactly one process can
create it) before it writes anything there, and a second run refuses with one sentence naming the
holder. A lock whose holder is gone (a dead pid on this host, e.g. after SIGKILL or a crash) is taken
over; a lock held on another host is never taken over, because its pid cannot be checked from here.

The lock is re-entrant within a process (the ``ksd-run`` callback takes it before Hydra writes
``.hydra/``, and :func:`ksd.runner.execute` takes it again) and is released when the last holder lets
go, or at the latest when the process exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ksd.results import WriteError

LOCK_NAME = ".ksd-run.lock"


class OutputLocked(RuntimeError):
    """The output directory is in use by another live run; the message is one sentence for the user."""


#: Locks this process holds: lock path -> (re-entrancy count, the content it wrote).
_held: dict[Path, tuple[int, dict[str, Any]]] = {}


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it is gone; a damaged lock reads as an empty holder."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any]) -> bool:
    """A holder that no longer runs: a dead pid on this host (or an unreadable lock left by a crash)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or not _alive(pid, holder.get("started"))


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "its lock file cannot be read"
    since = holder.get("since")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{when}"


@contextlib.contextmanager
def _takeover_mutex(directory: Path) -> Iterator[None]:
    """Serialise stale-lock takeovers on this host (``flock`` of the directory itself, released at
    close or death), so that two processes can never both remove a lock and one of them a fresh one."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # no flock on this filesystem: takeovers are then unguarded
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _create(path: Path, content: dict[str, Any]) -> None:
    """Create the lock file with its content, or raise FileExistsError; never leaves a partial lock.

    The content goes to a temporary file that is then hard-linked to the lock's name: the link
    appears complete or not at all, and fails if the name exists (also on NFS). Where hard links are
    not supported, ``O_EXCL`` creation is the fallback.
    """
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            pass
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def acquire(directory: Path) -> Path:
    """Take the lock of ``directory`` for this process; raise :class:`OutputLocked` if a live run holds it.

    Returns the lock file's path. Taking a lock this process already holds only counts up.
    """
    directory = Path(os.path.realpath(directory))
    path = directory / LOCK_NAME
    if path in _held:
        count, content = _held[path]
        _held[path] = (count + 1, content)
        return path
    pid = os.getpid()
    content = {"pid": pid, "host": socket.gethostname(), "since": time.time(), "started": _start_time(pid)}
    for _ in range(100):  # each pass either creates the lock, refuses, or removes a stale one
        try:
            _create(path, content)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # released between our two calls
                continue
            if not _stale(holder):
                raise OutputLocked(
                    f"{directory} is in use by another run ({_describe(holder)}); wait for it to end or "
                    f"choose another output directory (if that run is gone, delete {path})."
                ) from None
            with _takeover_mutex(directory):
                if _read(path) == holder:  # still the stale one: nobody took it over meanwhile
                    path.unlink(missing_ok=True)
            continue
        except OSError as err:  # e.g. a full disk: no room even for the lock
            raise WriteError.of(path, err) from err
        _held[path] = (1, content)
        return path
    raise OutputLocked(f"could not take the lock {path}: other runs keep taking it over.")


def release(path: Path, every_hold: bool = False) -> None:
    """Let go of a lock taken with :func:`acquire`; the file goes when the last holder lets go.

    ``every_hold``: remove it now whoever else in this process holds it (a run that is about to hand a
    stop signal on, after which the process may die without running its ``finally`` blocks).
    """
    count, content = _held.get(path, (0, {}))
    if count > 1 and not every_hold:
        _held[path] = (count - 1, content)
        return
    _held.pop(path, None)
    if count and _read(path) == content:  # never remove a lock that another run took over
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[Path]:
    """Hold the lock of ``directory`` for the duration of the block."""
    path = acquire(directory)
    try:
        yield path
    finally:
        release(path)


def release_all() -> None:
    """Remove every lock this process still holds (run at exit: a ``sys.exit`` skips no lock)."""
    for path in list(_held):
        release(path, every_hold=True)


atexit.register(release_all)
