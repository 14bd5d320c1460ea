"""Small on-disk cache for decoded data (CIFAR-10 from LZMA ``.npz``, generated CURVES).

The cache directory is ``$KSD_CACHE`` if set, else ``~/.cache/ksd``; it is created on first write and never
lives inside the data root (which may be read-only). Files are uncompressed ``.npz`` archives written to a
temporary name and renamed into place, so an interrupted write never leaves a half file under the final
name. A cache that cannot be written or read only costs time: it triggers a warning, never an error.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """``$KSD_CACHE`` if set (and non-empty), else ``~/.cache/ksd``."""
    env = os.environ.get("KSD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ksd"


def files_key(paths: Iterable[Path]) -> str:
    """A short hash of the names, sizes and modification times of ``paths`` (a cache key)."""
    digest = hashlib.sha1()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_arrays(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray] | None:
    """Read ``keys`` from the cached ``.npz`` at ``path``; None if it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable cache file {path} ({exc}); it will be rebuilt", stacklevel=3)
        return None


def save_arrays(path: Path, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path`` atomically; False on failure."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a cache may be shared
        os.replace(tmp, path)
        return True
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(
            f"could not write the data cache {path} ({exc}); set KSD_CACHE to a writable folder "
            "to make the next load fast",
            stacklevel=3,
        )
        return False
