"""Download MNIST or CIFAR-10 with torchvision into the layout that ``ksd.data`` reads.

    python scripts/fetch_data.py mnist   [--root DIR]   # -> DIR/MNIST/raw/*-ubyte(.gz)
    python scripts/fetch_data.py cifar10 [--root DIR]   # -> DIR/cifar-10-batches-py/

DIR defaults to $KSD_DATA, else ./data (the same default as ``ksd.data.default_root``). Needs torchvision
and internet access; torchvision is imported only when a download is requested. Exit status: 0 on
success, 1 if the download failed, 2 if torchvision is not installed. CURVES cannot be fetched this way:
``ksd.data`` reads ``curves/digs3pts_1.mat`` when present and otherwise generates a synthetic stand-in.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_root() -> Path:
    """$KSD_DATA if set, else ./data."""
    env = os.environ.get("KSD_DATA")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def fetch(name: str, root: Path) -> int:
    """Download ``name`` ("mnist" or "cifar10") into ``root``; return a process exit status."""
    try:
        from torchvision import datasets
    except ImportError:
        print(
            "fetch_data.py needs torchvision (pip install torchvision), which is not installed.",
            file=sys.stderr,
        )
        return 2
    root.mkdir(parents=True, exist_ok=True)
    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # network errors, checksum failures, full disks ...
        print(f"Downloading {name} into {root} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    where = root / ("MNIST/raw" if name == "mnist" else "cifar-10-batches-py")
    print(f"{name} is ready in {where}; use dataset.root={root} or KSD_DATA={root}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download MNIST or CIFAR-10 with torchvision for ksd.data.")
    parser.add_argument("dataset", choices=["mnist", "cifar10"], help="data set to download")
    parser.add_argument("--root", type=Path, default=None, help="data root (default: $KSD_DATA or ./data)")
    args = parser.parse_args(argv)
    return fetch(args.dataset, (args.root or default_root()).expanduser())


if __name__ == "__main__":
    sys.exit(main())
