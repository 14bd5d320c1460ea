"""``examples/own_model.py``: a user-defined model trained by every method of the library API."""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import pytest
from conftest import REPO

from ksd.data import load_dataset
from ksd.optim import LIBRARY

EXAMPLE = REPO / "examples" / "own_model.py"


@pytest.fixture(scope="module")
def own_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_covers_every_method(own_model):
    assert set(own_model.SETTINGS) == set(LIBRARY)


@pytest.mark.parametrize("method", sorted(LIBRARY))
def test_each_method_lowers_the_training_loss_of_the_user_model(own_model, method):
    inputs, labels = own_model.make_data()
    losses = own_model.train(method, inputs, labels, steps=10)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.9 * losses[0], losses


def test_the_script_runs_and_writes_data_for_ksd_run(tmp_path, own_model, capsys):
    assert own_model.main(["sgd", "lbfgs", "--steps=3"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["sgd", "lbfgs"]
    with pytest.raises(SystemExit):
        own_model.main(["newton"])
    assert "unknown method(s) newton" in capsys.readouterr().err
    data = tmp_path / "blobs.npz"
    assert own_model.main(["--save", str(data)]) == 0
    splits = load_dataset("tensors", None, path=str(data), val_size=0)
    assert (len(splits.train), len(splits.test), splits.spec.num_classes) == (500, 100, 3)
