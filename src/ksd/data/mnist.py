"""MNIST reader: LeCun's IDX files in the torchvision layout ``<root>/MNIST/raw/``.

Files (each gzip-compressed with a ``.gz`` suffix, or uncompressed without it; the uncompressed names may
also use the dotted spelling ``train-images.idx3-ubyte``):

- ``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``: big-endian header of four int32 -- magic 2051
  (``0x00000803``: unsigned bytes, 3 dimensions), count, rows (28), cols (28) -- then count*28*28 uint8
  pixels, row-major, 0 = background, 255 = ink. 16-byte header.
- ``train-labels-idx1-ubyte``, ``t10k-labels-idx1-ubyte``: magic 2049 (``0x00000801``), count, then count
  uint8 labels 0..9. 8-byte header.

Magic numbers, image size, label range and the exact file length (header + payload) are checked, so a
truncated download or a swapped file gives a :class:`DataError` naming the file. ``<root>`` itself is also
searched, for users who point the root straight at the folder with the files. Images come back as uint8
(N, 1, 28, 28); ``load_dataset`` divides by 255.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .splits import DataError, RawData

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (
    "Point dataset.root or KSD_DATA at a folder with that layout, or run "
    "`python scripts/fetch_data.py mnist` (needs torchvision and internet)."
)


def _names(base: str) -> list[str]:
    """Accepted file names for one IDX file, in order of preference."""
    dotted = base.replace("-idx", ".idx", 1)  # train-images.idx3-ubyte
    return [base, dotted, base + ".gz", dotted + ".gz"]


def _find(directory: Path, base: str) -> Path | None:
    for name in _names(base):
        path = directory / name
        if path.is_file():
            return path
    return None


def find_mnist_files(root: Path) -> tuple[dict[str, Path], str]:
    """Locate the four IDX files under ``root``; return them and a description of the folder."""
    raw_dir = root / "MNIST" / "raw"
    for directory in (raw_dir, root):
        found = {key: _find(directory, base) for key, base in FILES.items()}
        if all(path is not None for path in found.values()):
            return {key: path for key, path in found.items() if path is not None}, str(directory)
    expected = ", ".join(f"{base}(.gz)" for base in FILES.values())
    if not root.is_dir():
        why = f" (the data root {root} does not exist)"
    elif raw_dir.is_dir():
        missing = [base for base in FILES.values() if _find(raw_dir, base) is None]
        why = f" (missing there: {', '.join(missing)})"
    else:
        why = f" (the folder {raw_dir} does not exist)"
    raise DataError(f"MNIST not found: expected {expected} in {raw_dir}{why}. {_HOW_TO_GET}")


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Could not read MNIST file {path}: {exc.strerror or exc}.") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(
                f"MNIST file {path} is not a valid gzip file ({exc}): it is probably truncated; "
                f"replace it with a fresh copy (md5 sums in shared/data/README.md)."
            ) from exc
    if path.suffix == ".gz":
        raise DataError(
            f"MNIST file {path} is named .gz but is not gzip-compressed (first bytes {data[:4]!r})."
        )
    return data


def read_idx(path: Path, *, images: bool) -> np.ndarray:
    """Parse one IDX file: uint8 (N, 28, 28) images or int64 (N,) labels, with format checks."""
    data = _read_bytes(path)
    magic_expected, header = (IMAGE_MAGIC, 16) if images else (LABEL_MAGIC, 8)
    kind = "image file (magic 2051)" if images else "label file (magic 2049)"
    if len(data) < header:
        raise DataError(f"MNIST file {path} has only {len(data)} bytes, too few for an IDX {kind} header.")
    fields = [int.from_bytes(data[i : i + 4], "big") for i in range(0, header, 4)]
    magic, count, dims = fields[0], fields[1], fields[2:]
    if magic != magic_expected:
        raise DataError(
            f"MNIST file {path} has magic number {magic} ({magic:#010x}) but an IDX {kind} was expected: "
            f"the file is of the wrong kind or corrupt."
        )
    if images and dims != [28, 28]:
        raise DataError(f"MNIST file {path} holds {dims[0]}x{dims[1]} images, expected 28x28.")
    expected_len = header + count * (784 if images else 1)
    if len(data) != expected_len:
        state = "truncated" if len(data) < expected_len else "longer than its header says"
        raise DataError(
            f"MNIST file {path} is {state}: {len(data)} bytes (uncompressed) but its header "
            f"(count {count}) implies {expected_len}."
        )
    payload = np.frombuffer(data, dtype=np.uint8, offset=header)
    if images:
        return payload.reshape(count, 28, 28)
    if count and int(payload.max()) > 9:
        raise DataError(f"MNIST file {path} contains label {int(payload.max())}, expected labels 0-9.")
    return payload.astype(np.int64)


def read_mnist(root: Path) -> RawData:
    """Read all four MNIST files under ``root`` (see the module docstring)."""
    files, where = find_mnist_files(root)
    arrays = {key: read_idx(path, images=key.endswith("images")) for key, path in files.items()}
    for part in ("train", "test"):
        n_images, n_labels = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_images != n_labels:
            raise DataError(
                f"MNIST {part} files disagree: {files[f'{part}_images']} holds {n_images} images but "
                f"{files[f'{part}_labels']} holds {n_labels} labels."
            )
    return RawData(
        train_x=arrays["train_images"][:, None],
        train_y=arrays["train_labels"],
        test_x=arrays["test_images"][:, None],
        test_y=arrays["test_labels"],
        source=f"MNIST IDX files in {where}",
    )
