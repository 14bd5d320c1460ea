"""End-to-end runs through the same path as `ksd-run`: every documented combination trains and learns."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import compose_config

from ksd.runner import execute


def run(tmp_path, monkeypatch, data_root, *overrides: str) -> tuple[dict, list[dict]]:
    monkeypatch.setenv("KSD_DATA", str(data_root))
    summary = execute(compose_config(*overrides), tmp_path, progress=False)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == summary["status"]
    return summary, rows


@pytest.mark.parametrize(
    ("optimizer", "extra"),
    [
        ("sgd", ["optimizer.lr=0.05"]),
        # the full-batch methods take several times as long: slow set
        pytest.param("lbfgs", ["optimizer.batch_size=null"], marks=pytest.mark.slow),
        pytest.param("ncg", ["optimizer.batch_size=null"], marks=pytest.mark.slow),
        ("rmsprop", []),
        ("adagrad", []),
    ],
)
def test_mnist_autoencoder_learns(tmp_path, monkeypatch, data_root, optimizer, extra):
    summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=mnist",
        "model=autoencoder",
        f"optimizer={optimizer}",
        "dataset.train_size=1000",
        "dataset.test_size=500",
        "model.widths=[128,32]",
        "run.max_steps=40",
        "run.eval_every=20",
        "run.max_seconds=null",
        "run.max_epochs=null",
        *extra,
    )
    assert summary["status"] == "completed" and summary["steps"] == 40
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.7 * first, (first, last)
    assert {
        "step",
        "epoch",
        "wall_time",
        "train_loss",
        "val_loss",
        "test_loss",
        "train_error",
        "test_error",
    } <= set(rows[0])
    assert (tmp_path / "convergence.png").stat().st_size > 10_000


@pytest.mark.slow  # about 70 s; the default suite reached 596 s of its 600 s budget in CI with it
def test_mnist_mlp_adam_passes_88_percent_test_accuracy(tmp_path, monkeypatch, data_root):
    """One epoch of 20,000 images (200 Adam steps) gave 0.8996 with 1 thread and 0.9002 with 2 on
    2026-12-02 (the same before and after that day's changes): 90 % sat on the rounding of the thread
    count. 88 % leaves room for other machines; chance is 10 %, so a broken data or training path fails."""
    summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=mnist",
        "model=mlp",
        "optimizer=adam",
        "dataset.train_size=20000",
        "dataset.test_size=5000",
        "model.widths=[512,256]",
        "run.max_epochs=1",
        "run.max_seconds=null",
        "run.eval_every=100",
    )
    assert summary["status"] == "completed"
    assert float(rows[-1]["test_accuracy"]) > 0.88
    assert summary["final"]["test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))


@pytest.mark.slow  # real-data learning (a CNN on CIFAR-10)
def test_cifar10_cnn_adam_learns(tmp_path, monkeypatch, data_root):
    _summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=cifar10",
        "model=cnn",
        "optimizer=adam",
        "dataset.train_size=2000",
        "dataset.test_size=500",
        "dataset.val_size=500",
        "run.max_steps=60",
        "run.eval_every=30",
        "run.max_seconds=null",
        "run.eval_train_size=1000",
    )
    assert float(rows[-1]["train_loss"]) < 0.95 * float(rows[0]["train_loss"])
    assert float(rows[-1]["test_accuracy"]) > 0.15  # chance is 0.10


def test_default_curves_autoencoder_run(tmp_path, monkeypatch, data_root):
    summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "run.max_steps=3",
        "run.eval_every=1",
        "dataset.train_size=1000",  # 3000 until 2026-12-03: the same drop (894 -> 139), several times faster
        "dataset.test_size=1000",
    )
    assert summary["dataset"] == "curves" and "generated" in summary["data_source"].lower()
    assert summary["optimizer"] == "ksd"  # the default run of `make run`
    # KSD's first three iterations take the loss far below its starting value
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])


def test_divergence_is_recorded_not_raised(tmp_path, monkeypatch, data_root):
    summary, _ = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=mnist",
        "model=autoencoder",
        "optimizer=sgd",
        "model.activation=relu",
        "model.loss=squared_error",
        "optimizer.lr=1e3",
        "dataset.train_size=500",
        "dataset.test_size=100",
        "model.widths=[32,8]",
        "run.max_steps=50",
        "run.eval_every=5",
        "run.max_seconds=null",
    )
    assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
    assert summary["steps"] < 50


def test_budget_in_epochs_is_respected(tmp_path, monkeypatch, data_root):
    summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=mnist",
        "optimizer=sgd",
        "model.widths=[32,8]",
        "dataset.train_size=1000",
        "dataset.test_size=100",
        "optimizer.batch_size=100",
        "run.max_epochs=2",
        "run.max_seconds=null",
        "run.eval_every=7",
    )
    assert summary["steps"] == 20 and summary["epochs"] == pytest.approx(2.0)
    assert [int(r["step"]) for r in rows] == [0, 7, 14, 20]


def test_evaluations_by_epochs_do_not_depend_on_the_clock(tmp_path, monkeypatch, data_root):
    """run.eval_epochs: a row whenever half an epoch of gradient examples passed (every 5 steps of 100
    of 1,000 examples), besides every run.eval_every steps; nothing here depends on how fast steps are."""
    _summary, rows = run(
        tmp_path,
        monkeypatch,
        data_root,
        "dataset=mnist",
        "optimizer=sgd",
        "model.widths=[32,8]",
        "dataset.train_size=1000",
        "dataset.test_size=100",
        "optimizer.batch_size=100",
        "run.max_epochs=2",
        "run.eval_every=7",
        "run.eval_epochs=0.5",
        "run.eval_seconds=null",
    )
    assert [int(r["step"]) for r in rows] == [0, 5, 7, 12, 14, 19, 20]


def test_closing_line_says_what_was_reached_and_where(tmp_path):
    from ksd.cli import closing_line

    (tmp_path / "metrics.csv").write_text("step\n")
    summary = {"status": "completed", "steps": 12, "epochs": 80.25, "wall_time": 101.26,
               "final": {"train_loss": 104.83, "test_loss": 104.2, "val_loss": 104.5}}
    assert closing_line(summary, tmp_path) == (
        "ksd-run: completed after 12 steps, 80.25 epochs, 101.3 s of training: train loss 104.8, "
        f"test loss 104.2; files in {tmp_path}/ (metrics.csv)"
    )
    diverged = {"status": "diverged", "reason": "non-finite training loss by step 3", "steps": 3,
                "epochs": 0.3, "wall_time": 0.5, "final": {}}
    assert closing_line(diverged, tmp_path).startswith(
        "ksd-run: diverged (non-finite training loss by step 3) after 3 steps, 0.30 epochs, 0.5 s of "
        "training: no evaluation; "
    )
