"""Checkpoint and resume: an interrupted run continues exactly where it stopped."""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch
from conftest import compose_config
from torch import nn

from ksd.config import RunConfig
from ksd.data import DataSpec, Split, Splits
from ksd.engine import Trainer
from ksd.losses import build_loss
from ksd.optim import OPTIMIZERS, optimizer_class
from ksd.problem import Problem
from ksd.runner import execute

#: Settings that keep every optimizer's steps cheap on the toy problem below (applied where the field exists).
SMALL = {
    "batch_size": 64,
    "krylov_dim": 4,
    "curvature_size": 64,
    "bfgs_size": 64,
    "bfgs_max_iterations": 5,
    "max_cg_iterations": 10,
}


def toy_problem() -> Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 4, 4, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 16))
    splits = Splits(
        Split(x, None), Split(x[:32], None), Split(x[:64], None), DataSpec("toy", (1, 4, 4), None, "toy")
    )
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True, seed=0)


def make(name: str):
    problem = toy_problem()
    cls = optimizer_class(name)
    fields = cls.Config.__dataclass_fields__
    config = cls.Config(**{k: v for k, v in SMALL.items() if k in fields})
    return problem, cls(problem, config)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


# K-BFGS(L) (ring buffers of pairs, counters, generator) in the fast set, every other one in the slow set
@pytest.mark.parametrize(
    "name", [n if n == "kbfgs_l" else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS]
)
def test_interrupted_and_resumed_run_equals_uninterrupted(name):
    cfg = RunConfig(
        max_steps=12,
        max_epochs=None,
        max_seconds=None,
        eval_every=2,
        eval_train_size=None,
        plot=False,
        checkpoint_every=0,
    )
    problem, optimizer = make(name)
    reference = Trainer(problem, optimizer, cfg, on_row=lambda row: None).run()

    saved: list[dict] = []
    problem, optimizer = make(name)

    def interrupt_after_step_6(row: dict) -> None:
        if row["step"] == 6:
            os.kill(os.getpid(), signal.SIGUSR2)  # as SLURM does before preemption

    first = Trainer(problem, optimizer, cfg, on_row=interrupt_after_step_6, checkpoint=saved.append).run()
    assert first.status == "interrupted" and first.steps == 6 and len(saved) == 1
    state = torch.load(_roundtrip(saved[0]), weights_only=False)  # what survives a file

    problem, optimizer = make(name)
    resumed_trainer = Trainer(problem, optimizer, cfg, on_row=lambda row: None)
    resumed_trainer.load_state_dict(state)
    resumed = resumed_trainer.run()
    assert resumed.status == "completed" and resumed.steps == 12
    assert comparable(resumed.rows) == comparable(reference.rows)


def _roundtrip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_rerunning_in_the_same_directory_resumes(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("KSD_DATA", str(data_root))
    overrides = [
        "dataset=mnist",
        "optimizer=sgd",
        "model.widths=[32,8]",
        "dataset.train_size=500",
        "dataset.test_size=100",
        "run.max_steps=20",
        "run.eval_every=4",
        "run.max_seconds=null",
        "run.max_epochs=null",
    ]
    reference = execute(compose_config(*overrides), tmp_path / "reference", progress=False)

    import ksd.engine

    original = ksd.engine.Trainer._record

    def record_then_stop(self):
        ok = original(self)
        if self.outcome.steps == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return ok

    monkeypatch.setattr(ksd.engine.Trainer, "_record", record_then_stop)
    monkeypatch.setattr(signal, "raise_signal", lambda signum: None)  # keep pytest alive: no re-delivery
    out = tmp_path / "interrupted"
    first = execute(compose_config(*overrides), out, progress=False)
    assert first["status"] == "interrupted" and (out / "checkpoint.pt").exists()
    monkeypatch.setattr(ksd.engine.Trainer, "_record", original)
    second = execute(compose_config(*overrides), out, progress=False)
    assert second["status"] == "completed" and not (out / "checkpoint.pt").exists()

    def rows(path):
        with open(path / "metrics.csv") as f:
            return comparable(list(csv.DictReader(f)))

    assert rows(out) == rows(tmp_path / "reference")
    assert second["final"]["train_loss"] == reference["final"]["train_loss"]
