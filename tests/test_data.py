"""Tests for ksd.data: the real files in shared/data (MNIST, CIFAR-10), CURVES, errors, carving, augmentation.

The real data root is conftest's ``DATA``: ``$KSD_DATA`` if set, else ``<repo>/../shared/data``;
tests that need it are skipped, with the path in the reason, when it is absent, and fail instead when
``KSD_REQUIRE_DATA`` is set (as in CI). The cache (``KSD_CACHE``) points at a per-session temporary folder,
so the cold paths (CIFAR-10 LZMA decode, CURVES generation) run once per session and the user's cache is
never touched.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import DATA, REPO, missing_data

from ksd.data import DATASETS, DataError, Splits, default_root, load_dataset
from ksd.data import cifar10 as cifar_mod
from ksd.data import curves as curves_mod
from ksd.data.cifar10 import augment_cifar
from ksd.data.splits import carve_indices

MNIST_RAW = DATA / "MNIST" / "raw"
MNIST_GZ = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
HAS_MNIST = all((MNIST_RAW / f"{name}.gz").is_file() for name in MNIST_GZ)
HAS_CIFAR = (DATA / "cifar10").is_dir() or (DATA / "cifar-10-batches-py").is_dir()


@pytest.fixture
def _mnist_files() -> None:
    if not HAS_MNIST:
        missing_data(f"MNIST .gz files not found in {MNIST_RAW} (set KSD_DATA)")


@pytest.fixture
def _cifar_files() -> None:
    if not HAS_CIFAR:
        missing_data(f"CIFAR-10 not found in {DATA} (set KSD_DATA)")


# skipped without the files, failed under KSD_REQUIRE_DATA (conftest.missing_data)
needs_mnist = pytest.mark.usefixtures("_mnist_files")
needs_cifar = pytest.mark.usefixtures("_cifar_files")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh KSD_CACHE for the whole session."""
    path = tmp_path_factory.mktemp("ksd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSD_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def curves_splits(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Splits:
    """Generated CURVES (the root has no .mat file), loaded once per session."""
    return load_dataset("curves", tmp_path_factory.mktemp("no_curves"), val_size=0)


@pytest.fixture
def mnist_copy(tmp_path: Path) -> Path:
    """A writable copy of the MNIST .gz files in tmp_path/MNIST/raw; returns the root tmp_path."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_GZ:
        shutil.copyfile(MNIST_RAW / f"{name}.gz", raw / f"{name}.gz")
    return tmp_path


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    array = x.reshape(len(x), -1).numpy()
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in array}


# --------------------------------------------------------------------------------------------- general


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KSD_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("KSD_DATA")
    assert default_root() == Path.cwd() / "data"
    assert {"mnist", "curves", "cifar10", "text"} <= set(DATASETS)


def test_unknown_dataset_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Unknown data set 'svhn'"):
        load_dataset("svhn", tmp_path, val_size=0)
    with pytest.raises(DataError, match="val_size must be an integer >= 0, got -1"):
        load_dataset("mnist", tmp_path, val_size=-1)
    with pytest.raises(DataError, match="train_size must be an integer >= 1"):
        load_dataset("mnist", tmp_path, val_size=0, train_size=0)
    with pytest.raises(DataError, match="test_size"):
        load_dataset("mnist", tmp_path, val_size=0, test_size=-5)
    with pytest.raises(DataError, match="val_size"):
        load_dataset("mnist", tmp_path, val_size=True)
    with pytest.raises(DataError, match="val_size"):
        load_dataset("mnist", tmp_path, val_size=2.5)  # type: ignore[arg-type]


def test_carve_indices() -> None:
    train, val = carve_indices(1000, val_size=100, train_size=None, seed=0)
    assert train.dtype == val.dtype == torch.int64
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
    train_again, val_again = carve_indices(1000, val_size=100, train_size=None, seed=0)
    assert torch.equal(val, val_again) and torch.equal(train, train_again)
    _, val_other = carve_indices(1000, val_size=100, train_size=None, seed=1)
    assert not torch.equal(val, val_other)
    small, _ = carve_indices(1000, val_size=100, train_size=50, seed=0)
    assert torch.equal(small, train[:50])
    with pytest.raises(DataError, match="leaves no training examples"):
        carve_indices(1000, val_size=1000, train_size=None, seed=0)
    with pytest.raises(DataError, match="train_size=901 is larger"):
        carve_indices(1000, val_size=100, train_size=901, seed=0)


# ----------------------------------------------------------------------------------------------- MNIST


@needs_mnist
def test_mnist_full_facts() -> None:
    s = load_dataset("mnist", DATA, val_size=0)
    assert (len(s.train), len(s.val), len(s.test)) == (60000, 0, 10000)
    assert s.spec.name == "mnist" and s.spec.input_shape == (1, 28, 28) and s.spec.num_classes == 10
    assert "IDX" in s.spec.source
    x = s.train.inputs
    assert x.dtype == torch.float32 and x.shape == (60000, 1, 28, 28)
    assert (
        s.val.inputs.shape == (0, 1, 28, 28)
        and s.val.labels is not None
        and s.val.labels.dtype == torch.int64
    )
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    # well-known MNIST facts: normalisation constants, first labels, class counts
    assert abs(x.mean().item() - 0.1307) < 5e-4 and abs(x.std().item() - 0.3081) < 5e-4
    assert s.train.labels is not None and s.test.labels is not None
    assert s.train.labels.dtype == torch.int64
    assert s.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert s.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(s.train.labels, minlength=10).tolist() == train_counts
    assert torch.bincount(s.test.labels, minlength=10).tolist() == test_counts
    # pixels are the raw bytes / 255: compare image 0 with the IDX payload read independently
    with gzip.open(MNIST_RAW / "train-images-idx3-ubyte.gz", "rb") as handle:
        first = np.frombuffer(handle.read(16 + 784)[16:], dtype=np.uint8).reshape(1, 28, 28)
    assert torch.equal(x[0], torch.from_numpy(first.copy()).float() / 255)


@needs_mnist
def test_mnist_carve_deterministic_disjoint_and_seeded() -> None:
    a = load_dataset("mnist", DATA, val_size=500, train_size=2000, test_size=300, seed=0)
    b = load_dataset("mnist", DATA, val_size=500, train_size=2000, test_size=300, seed=0)
    c = load_dataset("mnist", DATA, val_size=500, train_size=2000, test_size=300, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (2000, 500, 300)
    assert torch.equal(a.val.inputs, b.val.inputs) and torch.equal(a.train.inputs, b.train.inputs)
    assert torch.equal(a.val.labels, b.val.labels)  # type: ignore[arg-type]
    assert not torch.equal(a.val.inputs, c.val.inputs)
    assert _row_hashes(a.val.inputs).isdisjoint(_row_hashes(a.train.inputs))
    assert torch.equal(a.test.inputs, c.test.inputs)  # the test set does not depend on the seed
    assert any(
        "validation = 500 of the 60000 training examples drawn with seed 0" in line for line in a.notes
    )


@needs_mnist
def test_mnist_sizes_too_large() -> None:
    with pytest.raises(DataError, match="leaves no training examples"):
        load_dataset("mnist", DATA, val_size=60000)
    with pytest.raises(DataError, match="train_size=59001 is larger"):
        load_dataset("mnist", DATA, val_size=1000, train_size=59001)
    with pytest.raises(DataError, match="test_size=10001 is larger than the 10000"):
        load_dataset("mnist", DATA, val_size=0, test_size=10001)


def test_mnist_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="MNIST not found") as info:
        load_dataset("mnist", missing, val_size=0)
    message = str(info.value)
    assert str(missing / "MNIST" / "raw") in message and "does not exist" in message
    assert "train-images-idx3-ubyte(.gz)" in message and "scripts/fetch_data.py mnist" in message


@needs_mnist
def test_mnist_missing_file(mnist_copy: Path) -> None:
    (mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing there: t10k-labels-idx1-ubyte"):
        load_dataset("mnist", mnist_copy, val_size=0)


@needs_mnist
def test_mnist_truncated_gz(mnist_copy: Path) -> None:
    path = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz") as info:
        load_dataset("mnist", mnist_copy, val_size=0)
    assert "truncated" in str(info.value)


@needs_mnist
def test_mnist_wrong_kind_and_short_payload(mnist_copy: Path) -> None:
    raw = mnist_copy / "MNIST" / "raw"
    # a label file where the image file should be: wrong magic number
    shutil.copyfile(raw / "t10k-labels-idx1-ubyte.gz", raw / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz has magic number 2049"):
        load_dataset("mnist", mnist_copy, val_size=0)
    # a valid gzip stream of a truncated IDX payload: caught by the size check
    labels = gzip.decompress((MNIST_RAW / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        gzip.decompress((MNIST_RAW / "t10k-images-idx3-ubyte.gz").read_bytes())
    )
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-10]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz is truncated: 9998 bytes"):
        load_dataset("mnist", mnist_copy, val_size=0)


@needs_mnist
def test_mnist_uncompressed_idx(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_GZ:
        target = name.replace("-idx", ".idx", 1) if name.startswith("train-images") else name
        (raw / target).write_bytes(gzip.decompress((MNIST_RAW / f"{name}.gz").read_bytes()))
    assert (raw / "train-images.idx3-ubyte").is_file()  # the dotted spelling
    plain = load_dataset("mnist", tmp_path, val_size=100, train_size=500, test_size=200, seed=3)
    packed = load_dataset("mnist", DATA, val_size=100, train_size=500, test_size=200, seed=3)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(plain, part).inputs, getattr(packed, part).inputs)
        assert torch.equal(getattr(plain, part).labels, getattr(packed, part).labels)


# -------------------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.slow  # reads all 50,000 CIFAR-10 images
@needs_cifar
def test_cifar_readme_facts(cache_dir: Path) -> None:
    raw = cifar_mod.read_cifar10(DATA)  # cold: decodes the LZMA archives and writes the cache
    assert raw.train_x.shape == (50000, 3, 32, 32) and raw.train_x.dtype == np.uint8
    assert raw.train_x[0, 0, 0, :10].tolist() == [59, 43, 50, 68, 98, 119, 139, 145, 149, 149]
    assert raw.test_x[0, 0, 0, :10].tolist() == [158, 159, 165, 166, 160, 156, 162, 159, 158, 159]
    assert raw.train_y is not None and raw.test_y is not None
    assert raw.train_y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert raw.test_y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(raw.train_y).tolist() == [5000] * 10
    assert np.bincount(raw.train_y[:10000]).tolist() == [
        1005,
        974,
        1032,
        1016,
        999,
        937,
        1030,
        1001,
        1025,
        981,
    ]
    assert np.bincount(raw.test_y[:1000]).tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
    if "npz" in raw.source:
        assert len(raw.test_x) == 1000 and cifar_mod.NPZ_TEST_NOTE in raw.notes
        assert list(cache_dir.glob("cifar10-npz-*.npz")), "the decoded arrays were not cached"
        again = cifar_mod.read_cifar10(DATA)  # warm: from the cache
        assert "cached at" in again.source
        assert np.array_equal(again.train_x, raw.train_x) and np.array_equal(again.test_y, raw.test_y)


@pytest.mark.slow  # all 50,000 images; the reader's formats stay fast (test_cifar_pickle_layout, _missing)
@needs_cifar
def test_cifar_load_normalised_and_disjoint() -> None:
    s = load_dataset("cifar10", DATA, val_size=5000, seed=0)
    assert s.spec.input_shape == (3, 32, 32) and s.spec.num_classes == 10
    assert (len(s.train), len(s.val)) == (45000, 5000) and s.test.inputs.shape[1:] == (3, 32, 32)
    assert s.train.inputs.dtype == torch.float32 and s.train.labels.dtype == torch.int64  # type: ignore[union-attr]
    mean = s.train.inputs.mean(dim=(0, 2, 3))
    std = s.train.inputs.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-3)
    assert any(line.startswith("CIFAR-10 normalised per channel") for line in s.notes)
    if "npz" in s.spec.source:
        assert len(s.test) == 1000
        assert "CIFAR-10 test set = official test images 0-999 only (the shared .npz subset)" in s.notes
    # the first kept training image is raw image train_idx[0], normalised with the kept images' stats
    raw = cifar_mod.read_cifar10(DATA)
    train_idx, val_idx = carve_indices(50000, val_size=5000, train_size=None, seed=0)
    kept = raw.train_x[train_idx.numpy()]
    channels = [kept[:, c].astype(np.float64) / 255 for c in range(3)]  # float64, one channel at a time
    ref_mean = np.array([c.mean() for c in channels])[:, None, None]
    ref_std = np.array([c.std() for c in channels])[:, None, None]
    del channels
    expected = (raw.train_x[train_idx[0].item()] / 255 - ref_mean) / ref_std
    assert np.allclose(s.train.inputs[0].numpy(), expected, atol=1e-4)
    assert torch.equal(s.val.labels, torch.from_numpy(raw.train_y[val_idx.numpy()]))  # type: ignore[index]
    # README: no two CIFAR-10 images are identical, so disjoint index sets mean disjoint images
    assert _row_hashes(s.val.inputs).isdisjoint(_row_hashes(s.train.inputs))


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="CIFAR-10 not found") as info:
        load_dataset("cifar10", tmp_path, val_size=0)
    assert "cifar-10-batches-py" in str(info.value) and "scripts/fetch_data.py cifar10" in str(info.value)


def test_cifar_pickle_layout(tmp_path: Path) -> None:
    """The official python-version layout, with tiny fake batches."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, name in enumerate([*cifar_mod.PICKLE_TRAIN, cifar_mod.PICKLE_TEST]):
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": [k % 10] * 20}
        (folder / name).write_bytes(pickle.dumps(batch))
    s = load_dataset("cifar10", tmp_path, val_size=10, test_size=5)
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 5)
    assert "pickles" in s.spec.source and s.test.labels.tolist() == [5] * 5  # type: ignore[union-attr]


def test_augment_flip_only() -> None:
    x = torch.randn(32, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = [torch.equal(o, torch.flip(i, dims=[-1])) for o, i in zip(out, x)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert any(flipped) and any(same)


def test_augment_crop_and_determinism() -> None:
    x = torch.randn(16, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(1), flip=False)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    shifts = []
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert hits, f"image {i} is not a 32x32 crop of the padded input"
        shifts.append(hits[0])
    assert len(set(shifts)) > 1
    a = augment_cifar(x, torch.Generator().manual_seed(7))
    b = augment_cifar(x, torch.Generator().manual_seed(7))
    assert a.shape == x.shape and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- CURVES


def test_curves_generated(curves_splits: Splits, tmp_path: Path) -> None:
    s = curves_splits
    assert (len(s.train), len(s.val), len(s.test)) == (20000, 0, 10000)
    assert s.train.labels is None and s.val.labels is None and s.test.labels is None
    assert s.spec.name == "curves" and s.spec.num_classes is None and s.spec.input_shape == (1, 28, 28)
    assert "synthetic stand-in" in s.spec.source and "cached at" in s.spec.source
    for part in (s.train, s.test):
        x = part.inputs
        assert x.dtype == torch.float32 and x.min().item() >= 0.0 and x.max().item() == 1.0
        ink = (x > 0.5).float().mean(dim=(1, 2, 3))
        assert ink.min().item() >= 0.01 and ink.max().item() <= 0.40
    assert not torch.equal(s.train.inputs[0], s.train.inputs[1])
    # deterministic: generation twice gives the same images, equal to the cached/loaded ones
    first = curves_mod.generate_curves(300)
    assert np.array_equal(first, curves_mod.generate_curves(300))
    assert torch.equal(s.train.inputs[:300, 0], torch.from_numpy(first).float() / 255)
    again = load_dataset("curves", tmp_path, val_size=1000, seed=5)  # from the cache
    assert (len(again.train), len(again.val)) == (19000, 1000)
    assert torch.equal(again.test.inputs, s.test.inputs)


def test_curves_from_mat(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bdata, bdatatest = rng.random((50, 784)), rng.random((20, 784))
    (tmp_path / "curves").mkdir()
    scipy.io.savemat(tmp_path / "curves" / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": bdatatest})
    s = load_dataset("curves", tmp_path, val_size=10, test_size=15, seed=2)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 15)
    assert s.spec.source.endswith("digs3pts_1.mat") and s.train.labels is None
    expected = torch.from_numpy(bdatatest[:15].astype(np.float32)).reshape(15, 1, 28, 28)
    assert torch.equal(s.test.inputs, expected)


def test_curves_bad_mat(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": np.zeros((5, 784))})
    with pytest.raises(DataError, match="no variable 'bdatatest'"):
        load_dataset("curves", tmp_path, val_size=0)
    # a MATLAB v7.3 (HDF5) header: scipy cannot read it, h5py is not used
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ")
    (tmp_path / "digs3pts_1.mat").write_bytes(header + b"\0" * 8 + b"\x00\x02IM" + b"\0" * 512)
    with pytest.raises(DataError, match=r"v7\.3"):
        load_dataset("curves", tmp_path, val_size=0)


# ------------------------------------------------------------------------------------------ fetch script


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_fetch_script_without_torchvision(tmp_path: Path) -> None:
    script = REPO / "scripts" / "fetch_data.py"
    done = subprocess.run(
        [sys.executable, str(script), "mnist", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "torchvision" in done.stderr and len(done.stderr.strip().splitlines()) == 1
