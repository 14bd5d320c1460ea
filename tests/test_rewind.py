"""``run.on_divergence=rewind``: back to the last healthy evaluation with the step size halved.

Faults are injected at known steps into the toy autoencoder of ``test_faults``; the rewound run is
compared with a run that takes the same steps by hand (no fault, the step size halved at the rewound
evaluation), so the restored θ, optimizer state, random generators and data position are all checked
by one equality.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_faults import make

from ksd.config import RunConfig
from ksd.engine import Trainer
from ksd.errors import ConfigError
from ksd.optim import OPTIMIZERS

#: Optimizers whose step is exactly proportional to ``step_scale`` (a fixed step length); the others
#: apply it to a first trial step (line searches) or to a damping / cubic weight (HF, ARCs-LSR1).
PROPORTIONAL = {"sgd", "adam", "rmsprop", "adagrad", "kbfgs", "kbfgs_l", "kfac", "ksd"}


def rewind_config(**overrides) -> RunConfig:
    settings = dict(
        max_steps=20, max_epochs=None, eval_every=5, eval_train_size=None, plot=False, checkpoint_every=0,
        on_divergence="rewind",
    )
    return RunConfig(**(settings | overrides))


def fault_at(optimizer, fault, calls: set[int], mode: str = "output") -> list[int]:
    """Arm ``fault`` during the optimizer's ``step`` calls numbered in ``calls`` (1-based); returns the
    list of calls made, which grows as the run goes."""
    made: list[int] = []
    step = optimizer.step

    def faulty_step():
        made.append(len(made) + 1)
        fault.mode = mode if made[-1] in calls else None
        try:
            return step()
        finally:
            fault.mode = None

    optimizer.step = faulty_step
    return made


def test_nan_at_step_12_rewinds_to_step_10_and_halves_the_step():
    problem, optimizer, fault = make("sgd", lr=0.5)
    made = fault_at(optimizer, fault, {12})
    rows: list[dict] = []
    outcome = Trainer(problem, optimizer, rewind_config(), rows.append).run()

    # by hand: 10 steps at lr 0.5, the 11th to 15th (the NaN among them) thrown away, then 10 at 0.25
    reference, ref_optimizer, _ = make("sgd", lr=0.5)
    for _ in range(10):
        ref_optimizer.step()
    ref_optimizer.step_scale = 0.5
    for _ in range(10):
        ref_optimizer.step()

    assert outcome.status == "completed" and outcome.rewinds == 1 and outcome.steps == 20
    assert len(made) == 25  # 15 steps up to the evaluation that saw the NaN, then 10 after the rewind
    torch.testing.assert_close(problem.theta, reference.theta, rtol=0, atol=0)
    assert optimizer.step_scale == 0.5
    rewind = [row for row in rows if "rewind" in row]
    assert len(rewind) == 1 and rewind[0]["step"] == 15 and rewind[0]["step_scale"] == 0.5
    assert "non-finite training loss by step 15" in rewind[0]["rewind_reason"]
    assert "train_loss" not in rewind[0] and math.isnan(rewind[0]["rewound_loss"])
    assert [row["step"] for row in rows if "train_loss" in row] == [0, 5, 10, 15, 20]


def test_a_loss_above_the_factor_rewinds_too():
    problem, optimizer, _fault = make("sgd", lr=0.5)
    step, blown = optimizer.step, []

    def blow_up():  # a finite jump after the 7th step: every weight + 100 saturates every unit
        stats = step()
        if not blown and problem.counts.gradient == 7 * 32:
            problem.theta.add_(100.0)
            blown.append(True)
        return stats

    optimizer.step = blow_up
    rows: list[dict] = []
    outcome = Trainer(problem, optimizer, rewind_config(max_steps=15), rows.append).run()
    rewind = [row for row in rows if "rewind" in row]
    assert outcome.status == "completed" and outcome.rewinds == 1
    assert rewind[0]["step"] == 10 and "more than 10 × the last evaluation's" in rewind[0]["rewind_reason"]
    healthy = next(row["train_loss"] for row in rows if row.get("step") == 5 and "train_loss" in row)
    assert rewind[0]["rewound_loss"] > 10 * healthy


def test_the_divergence_after_max_rewinds_ends_the_run():
    problem, optimizer, fault = make("sgd", lr=0.5)
    fault_at(optimizer, fault, set(range(12, 1000)))  # from the 12th call on, every step is NaN
    rows: list[dict] = []
    outcome = Trainer(problem, optimizer, rewind_config(max_rewinds=2), rows.append).run()
    assert outcome.status == "diverged" and outcome.rewinds == 2
    assert outcome.reason == "non-finite training loss by step 15, after 2 rewinds"
    assert [row["step_scale"] for row in rows if "rewind" in row] == [0.5, 0.25]


def test_an_optimizer_raising_diverged_rewinds_at_that_step():
    problem, optimizer, fault = make("lbfgs")  # checks its loss and gradient inside the step
    fault_at(optimizer, fault, {7})
    rows: list[dict] = []
    outcome = Trainer(problem, optimizer, rewind_config(max_steps=12), rows.append).run()
    rewind = [row for row in rows if "rewind" in row]
    assert outcome.status == "completed" and outcome.rewinds == 1 and outcome.steps == 12
    assert rewind[0]["step"] == 6 and rewind[0]["rewind_reason"].startswith("Diverged: non-finite")
    assert optimizer.step_scale == 0.5


def test_stop_is_the_default_and_ends_the_run_at_the_nan():
    problem, optimizer, fault = make("sgd", lr=0.5)
    fault_at(optimizer, fault, {12})
    outcome = Trainer(problem, optimizer, rewind_config(on_divergence="stop"), lambda row: None).run()
    assert RunConfig().on_divergence == "stop"
    assert outcome.status == "diverged" and outcome.rewinds == 0 and outcome.steps == 15


def test_a_checkpoint_keeps_the_rewinds_and_the_halved_step():
    problem, optimizer, fault = make("sgd", lr=0.5)
    fault_at(optimizer, fault, {12})
    trainer = Trainer(problem, optimizer, rewind_config(), lambda row: None)
    trainer.run()
    state = trainer.state_dict()
    resumed_problem, resumed_optimizer, _ = make("sgd", lr=0.5)
    resumed = Trainer(resumed_problem, resumed_optimizer, rewind_config(max_steps=30), lambda row: None)
    resumed.load_state_dict(state)
    assert resumed.outcome.rewinds == 1 and resumed_optimizer.step_scale == 0.5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_applies_its_step_scale(name):
    """One step from the same point with ``step_scale`` 1 and 0.5: the step changes (exactly halves for
    the fixed-step methods)."""
    steps = []
    for scale in (1.0, 0.5):
        problem, optimizer, _ = make(name)
        optimizer.step_scale = scale
        before = problem.theta.clone()
        optimizer.step()
        steps.append(problem.theta - before)
    assert not torch.allclose(steps[0], steps[1]), f"{name} ignores step_scale"
    if name in PROPORTIONAL:
        torch.testing.assert_close(steps[1], 0.5 * steps[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"on_divergence": "retry"}, "run.on_divergence must be stop or rewind, got 'retry'."),
        ({"rewind_loss_factor": 1.0}, "run.rewind_loss_factor must be > 1, got 1.0."),
        ({"max_rewinds": 0}, "run.max_rewinds must be >= 1, got 0."),
    ],
)
def test_bad_rewind_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**overrides)
    assert str(err.value) == message


def test_a_rewind_run_is_not_the_completed_stop_run_of_the_same_directory():
    """``run.skip_completed`` compares the result-defining settings: the divergence policy is one."""
    from ksd.cli import _result_defining

    stop = {"seed": 0, "run": {"max_steps": 5}}
    rewind = {"seed": 0, "run": {"max_steps": 5, "on_divergence": "rewind"}}
    explicit_stop = {"seed": 0, "run": {"max_steps": 5, "on_divergence": "stop", "max_rewinds": 5}}
    assert _result_defining(stop) != _result_defining(rewind)
    assert _result_defining(stop) == _result_defining(explicit_stop)  # a run from before the setting
    assert _result_defining({**stop, "dtype": "float64"}) != _result_defining(stop)
