"""Your own data: ``dataset=tensors`` (.npz / .pt files) and ``dataset=torchvision`` (any torchvision set)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_cli_errors import assert_clean_failure, assert_no_partial_results, ksd_run

from ksd.config import validate
from ksd.data import DataError, DataSpec, load_dataset
from ksd.errors import ConfigError
from ksd.runner import REGISTRIES


def classification_npz(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "inputs": rng.integers(0, 256, size=(30, 1, 4, 4), dtype=np.uint8),
        "targets": rng.integers(0, 3, size=30),
        "test_inputs": rng.integers(0, 256, size=(8, 1, 4, 4), dtype=np.uint8),
        "test_targets": np.array([0, 1, 2, 3, 0, 1, 2, 3]),
    }
    np.savez(path, **arrays)
    return arrays


def test_npz_classification_images(tmp_path):
    arrays = classification_npz(tmp_path / "images.npz")
    splits = load_dataset("tensors", tmp_path, path="images.npz", val_size=5)  # relative: under root
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 8)
    assert splits.spec.input_shape == (1, 4, 4) and splits.spec.num_classes == 4  # largest label + 1
    assert splits.train.inputs.dtype == torch.float32 and splits.train.labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["test_inputs"]).float() / 255
    torch.testing.assert_close(splits.test.inputs, expected)
    assert splits.test.labels.tolist() == arrays["test_targets"].tolist()
    # validation + training rows are the file's rows, each once
    rows = torch.cat([splits.train.labels, splits.val.labels]).sort().values
    assert rows.tolist() == sorted(arrays["targets"].tolist())


def test_pt_without_targets_is_unlabelled_and_without_test_split(tmp_path):
    inputs = torch.randn(12, 6, dtype=torch.float64)
    torch.save({"inputs": inputs}, tmp_path / "features.pt")
    splits = load_dataset("tensors", None, path=str(tmp_path / "features.pt"), val_size=2)
    assert splits.spec.num_classes is None and splits.train.labels is None
    assert splits.spec.input_shape == (6,) and len(splits.test) == 0
    torch.testing.assert_close(torch.cat([splits.train.inputs, splits.val.inputs]).sort(0).values,
                               inputs.float().sort(0).values)


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Write one bad file per way of being wrong; return file name → a fragment of its error."""
    good = np.zeros((4, 3), np.float32)
    labels = np.array([0, 1, 0, 1])
    cases = {
        "float_targets.npz": ({"inputs": good, "targets": labels.astype(np.float32)}, "integer class labels"),
        "short_targets.npz": ({"inputs": good, "targets": labels[:3]}, "must have shape (4,)"),
        "negative.npz": ({"inputs": good, "targets": -labels}, "class indices >= 0"),
        "typo.npz": ({"input": good}, "unknown key(s) input"),
        "nan.npz": ({"inputs": np.full((4, 3), np.nan, np.float32)}, "NaN or infinite"),
        "one_dim.npz": ({"inputs": np.zeros(4, np.float32)}, "shape (N, ...)"),
        "test_shape.npz": ({"inputs": good, "test_inputs": np.zeros((2, 5), np.float32)}, "test_inputs have"),
        "half_labels.npz": ({"inputs": good, "targets": labels, "test_inputs": good}, "and test_targets"),
        "lonely.npz": ({"inputs": good, "test_targets": labels}, "test_targets but no test_inputs"),
        "text.npz": ({"inputs": np.array([["a", "b"]] * 4)}, "real numbers"),
    }
    for name, (arrays, _) in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip archive" * 10)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file" * 10)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    torch.save({"inputs": np.zeros((4, 3))}, tmp_path / "numpy.pt")
    (tmp_path / "data.csv").write_text("1,2\n")
    return {
        **{name: fragment for name, (_, fragment) in cases.items()},
        "garbage.npz": "as a NumPy .npz archive",
        "garbage.pt": "as a torch.save file of tensors",
        "list.pt": "holds a list",
        "numpy.pt": "as a torch.save file of tensors",
        "data.csv": "must be a .npz or .pt file",
        "missing.npz": "is not a file",
    }


def test_bad_files_are_refused_with_one_sentence_naming_them(tmp_path):
    for name, fragment in _bad_files(tmp_path).items():
        with pytest.raises(DataError) as caught:
            load_dataset("tensors", tmp_path, path=name, val_size=0)
        message = str(caught.value)
        assert fragment in message and name in message and "\n" not in message, (name, message)


def test_cli_bad_file_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3), np.float32), targets=np.zeros(4, np.float32))
    result = ksd_run(tmp_path, "dataset=tensors", f"dataset.path={tmp_path / 'd.npz'}", "model=mlp")
    assert_clean_failure(result, "integer class labels", "d.npz")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert_no_partial_results(tmp_path)


def test_missing_path_is_refused_before_reading_data():
    with pytest.raises(ConfigError, match=r"dataset=tensors needs dataset\.path"):
        validate(compose_config("dataset=tensors", "model=mlp"), REGISTRIES)


# ---------------------------------------------------------------------------------------------- torchvision
class _Tiny:
    """Stands in for a torchvision data set: RGB "PIL" images (H×W×C uint8 arrays) and labels."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        if not (Path(root) / "tiny").is_dir() and not download:
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        count = 6 if train else 3
        self.images = np.arange(count * 2 * 3 * 3, dtype=np.uint8).reshape(count, 2, 3, 3)
        self.labels = [i % 3 for i in range(count)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], self.labels[index]


class _Gray(_Tiny):
    """A split= data set with gray images (H×W), as SVHN's signature and MNIST's images."""

    def __init__(self, root: str, split: str = "train", download: bool = False) -> None:
        super().__init__(root, split == "train", download=True)
        self.images = self.images[..., 0]


@pytest.fixture
def fake_torchvision(monkeypatch):
    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(Tiny=_Tiny, Gray=_Gray)
    monkeypatch.setitem(sys.modules, "torchvision", module)


def test_torchvision_set_becomes_nchw_in_unit_range(tmp_path, fake_torchvision):
    (tmp_path / "tiny").mkdir()
    splits = load_dataset("Tiny", tmp_path, torchvision=True, val_size=1)
    reference = _Tiny(str(tmp_path), train=False)
    expected = torch.from_numpy(reference.images).permute(0, 3, 1, 2).float() / 255  # H×W×C → C×H×W
    torch.testing.assert_close(splits.test.inputs, expected)
    assert splits.test.labels.tolist() == reference.labels
    assert splits.spec == DataSpec("Tiny", (3, 2, 3), 3, f"torchvision.datasets.Tiny in {tmp_path}")
    assert (len(splits.train), len(splits.val)) == (5, 1)
    gray = load_dataset("Gray", tmp_path, torchvision=True, val_size=0)
    assert gray.spec.input_shape == (1, 2, 3)


def test_torchvision_missing_files_unknown_names_and_no_torchvision(tmp_path, fake_torchvision, monkeypatch):
    with pytest.raises(DataError, match=r"set dataset\.download=true"):
        load_dataset("Tiny", tmp_path, torchvision=True, val_size=0)
    assert len(load_dataset("Tiny", tmp_path, torchvision=True, download=True, val_size=0).train) == 6
    with pytest.raises(DataError, match="no data set 'Imagenette22'"):
        load_dataset("Imagenette22", tmp_path, torchvision=True, val_size=0)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, as when it is not installed
    with pytest.raises(DataError, match=r"needs torchvision, which is not installed: pip install"):
        load_dataset("Tiny", tmp_path, torchvision=True, val_size=0)


def test_torchvision_built_for_another_torch(tmp_path, monkeypatch):
    """A torchvision wheel for another torch build fails at import with a RuntimeError, not ImportError."""
    package = tmp_path / "site" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(DataError) as caught:
        load_dataset("MNIST", tmp_path, torchvision=True, val_size=0)
    assert str(caught.value) == (
        "dataset=torchvision: torchvision is installed but cannot be imported (operator torchvision::nms "
        f"does not exist); install the torchvision release built for this torch ({torch.__version__})."
    )


def test_cli_without_torchvision_one_line(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    result = ksd_run(tmp_path, "dataset=torchvision", "dataset.name=FashionMNIST", "model=mlp")
    assert_clean_failure(result, "needs torchvision", "pip install torchvision")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert_no_partial_results(tmp_path)

