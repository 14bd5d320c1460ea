"""The library API (``from ksd.optim import KSD, ...``): torch.optim-style, the same code path as ksd-run."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_config
from torch import nn

from ksd.data import load_dataset
from ksd.errors import ConfigError
from ksd.optim import (
    KBFGS,
    KBFGSL,
    KFAC,
    KSD,
    LBFGS,
    LIBRARY,
    OPTIMIZERS,
    SGD,
    ARCsLSR1,
    HessianFree,
    optimizer_class,
)
from ksd.runner import execute


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))


def blobs(count: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return torch.randn(3, 5, generator=generator)[labels] + torch.randn(count, 5, generator=generator), labels


def test_every_method_has_a_library_class_on_its_implementation():
    assert {KSD, HessianFree, KBFGS, KBFGSL, KFAC, ARCsLSR1, LBFGS} <= set(LIBRARY.values())
    assert set(LIBRARY) == set(OPTIMIZERS)
    for name, cls in LIBRARY.items():
        optimizer = cls(mlp(), "softmax_cross_entropy")
        assert type(optimizer.optimizer) is optimizer_class(name) and optimizer.config.batch_size is None


def test_library_and_ksd_run_follow_the_same_trajectory(tmp_path, monkeypatch):
    """KSD (random subsets, subspace BFGS) on a user model and a .npz file: ksd-run's metrics.csv and the
    library's steps agree step by step."""
    inputs, labels = blobs(120)
    np.savez(tmp_path / "blobs.npz", inputs=inputs.numpy(), targets=labels.numpy())
    monkeypatch.syspath_prepend(str(REPO / "examples"))  # own_model.MLP, as PYTHONPATH=examples would
    model_args = ["+model.inputs=5", "+model.hidden=12", "+model.classes=3"]
    cfg = compose_config(
        "dataset=tensors", f"dataset.path={tmp_path / 'blobs.npz'}", "model=custom",
        "model._target_=own_model.MLP", *model_args, "model.init=default", "optimizer=ksd",
        "optimizer.krylov_dim=4", "optimizer.curvature_size=40", "optimizer.bfgs_size=30", "seed=3",
        "run.max_steps=3", "run.eval_every=1", "run.eval_train_size=null", "run.max_seconds=null",
        "run.eval_seconds=null", "run.plot=false", "device=cpu",
    )
    execute(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    from own_model import MLP

    train = load_dataset("tensors", None, path=str(tmp_path / "blobs.npz"), val_size=0).train
    torch.manual_seed(3)  # what ksd-run seeds before building the model
    model = MLP(5, 12, 3)
    optimizer = KSD(model, "softmax_cross_entropy", krylov_dim=4, curvature_size=40, bfgs_size=30, seed=3)
    with torch.no_grad():
        initial = F.cross_entropy(model(inputs), labels).item()
    assert float(rows[0]["train_loss"]) == pytest.approx(initial, rel=1e-6)
    for row in rows[1:]:
        stats = optimizer.step(train.inputs, train.labels)
        for key in ("subspace_loss_before", "subspace_loss_after", "bfgs_iterations", "basis_size"):
            assert float(row[key]) == pytest.approx(float(stats[key]), rel=1e-6), key
        with torch.no_grad():
            loss = F.cross_entropy(model(inputs), labels).item()
        assert float(row["train_loss"]) == pytest.approx(loss, rel=1e-6)
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])


def test_sgd_steps_are_torch_sgd_steps():
    inputs, labels = blobs()
    model, reference = mlp(), mlp()
    optimizer = SGD(model, "softmax_cross_entropy", lr=0.1, momentum=0.9, weight_decay=1e-3)
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for start in range(0, 96, 32):
        batch = slice(start, start + 32)
        stats = optimizer.step(inputs[batch], labels[batch])
        torch_sgd.zero_grad()
        loss = F.cross_entropy(reference(inputs[batch]), labels[batch])
        loss.backward()
        torch_sgd.step()
        assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_step_reports_the_regularised_objective_before_it():
    inputs, labels = blobs()
    model = mlp()
    optimizer = LBFGS(model, "softmax_cross_entropy", weight_decay=0.01)
    with torch.no_grad():
        theta = torch.cat([p.flatten() for p in model.parameters()])
        expected = F.cross_entropy(model(inputs), labels) + 0.005 * theta.dot(theta)
    assert optimizer.step(inputs, labels)["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():  # the step moved the model's own parameters
        assert F.cross_entropy(model(inputs), labels).item() < expected.item()


def test_reconstruction_with_inputs_as_targets():
    torch.manual_seed(0)
    autoencoder = nn.Sequential(nn.Linear(8, 3), nn.Sigmoid(), nn.Linear(3, 8))
    codes = torch.rand(64, 3)
    images = torch.sigmoid(codes @ torch.randn(3, 8) * 3)  # in (0, 1): targets of the sigmoid cross-entropy
    optimizer = HessianFree(autoencoder, "sigmoid_cross_entropy", weight_decay=0.0, initial_damping=1.0)
    first = optimizer.step(images, images)["loss"].item()
    for _ in range(5):
        last = optimizer.step(images, images)["loss"].item()
    entropy = F.binary_cross_entropy(images, images, reduction="none").sum(1).mean().item()  # the minimum
    assert last - entropy < 0.5 * (first - entropy)


@pytest.mark.parametrize(
    ("name", "batch"),
    [("ksd", 96), ("kfac", 32), ("kbfgs_l", 32), ("arcs_lsr1", 32), ("lbfgs", 96), ("adam", 32)],
)
def test_state_dict_resumes_exactly(name, batch):
    inputs, labels = blobs()
    settings = {"krylov_dim": 4, "curvature_size": 30, "bfgs_size": 30} if name == "ksd" else {}
    settings |= {"history_size": 3} if name in ("kbfgs_l", "arcs_lsr1", "lbfgs") else {}

    def steps(optimizer, first: int, count: int) -> None:
        for step in range(first, first + count):
            start = step * batch % 96
            optimizer.step(inputs[start : start + batch], labels[start : start + batch])

    model = mlp()
    optimizer = LIBRARY[name](model, "softmax_cross_entropy", seed=5, **settings)
    steps(optimizer, 0, 3)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    steps(optimizer, 3, 3)

    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    resumed_model = mlp(seed=1)  # other initial weights: everything must come from the state
    resumed = LIBRARY[name](resumed_model, "softmax_cross_entropy", seed=0, **settings)
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["optimizer"])
    steps(resumed, 3, 3)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_each_step_may_hand_data_of_another_size():
    inputs, labels = blobs()
    ksd, hf = KSD(mlp(), "softmax_cross_entropy", krylov_dim=3), HessianFree(mlp(), "softmax_cross_entropy")
    for count in (96, 10, 2):
        assert ksd.step(inputs[:count], labels[:count])["basis_size"] >= 1
    hf.step(inputs[:4], labels[:4])  # num_chunks = 4: one example per curvature chunk
    with pytest.raises(ConfigError, match="at least 2 training examples, got 1"):
        ksd.step(inputs[:1], labels[:1])
    with pytest.raises(ConfigError, match="num_chunks=4 exceeds the 3 training examples"):
        hf.step(inputs[:3], labels[:3])


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(TypeError, match="KSD has no hyperparameter 'krylov_dims'; its hyperparameters are: "):
        KSD(mlp(), "softmax_cross_entropy", krylov_dims=5)
    with pytest.raises(TypeError, match=r"'batch_size' \(the batch is the data handed to step\(\)\)"):
        SGD(mlp(), "softmax_cross_entropy", batch_size=10)
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be > 0"):
        SGD(mlp(), "softmax_cross_entropy", lr=-1.0)
    with pytest.raises(ValueError, match=r"loss_fn must be a ksd\.losses\.Loss or one of"):
        SGD(mlp(), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="no parameters"):
        SGD(nn.Tanh(), "squared_error")
    inputs, labels = blobs()
    with pytest.raises(ValueError, match="as many targets as inputs"):
        SGD(mlp(), "softmax_cross_entropy").step(inputs, labels[:-1])
