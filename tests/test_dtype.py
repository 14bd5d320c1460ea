"""``dtype=float64``: parameters, input floats and every step in float64, from the float32 initialisation."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from ksd.config import validate
from ksd.errors import ConfigError
from ksd.runner import REGISTRIES, prepare

SMALL = ("dataset.train_size=64", "dataset.test_size=16", "optimizer=sgd", "optimizer.batch_size=16")


def built(*overrides: str):
    problem, optimizer, lines = prepare(validate(compose_config(*SMALL, *overrides), REGISTRIES))
    return problem, optimizer, lines


def test_float64_casts_parameters_and_data_from_the_same_initialisation():
    single, _, _ = built()
    double, optimizer, lines = built("dtype=float64")
    assert single.theta.dtype == torch.float32 and double.theta.dtype == torch.float64
    assert double.splits.train.inputs.dtype == torch.float64
    assert "device: cpu, float64" in lines
    # the same draw, then cast: float32 → float64 is exact
    assert torch.equal(double.theta, single.theta.double())
    assert torch.equal(double.splits.train.inputs, single.splits.train.inputs.double())
    optimizer.step()
    assert double.theta.dtype == torch.float64 and bool(torch.isfinite(double.theta).all())


def test_a_dtype_other_than_float32_or_float64_is_refused():
    with pytest.raises(ConfigError, match=r"^dtype must be float32 or float64, got 'float16'\.$"):
        validate(compose_config("dtype=float16"), REGISTRIES)
