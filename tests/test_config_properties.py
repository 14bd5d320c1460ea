"""Property-based tests of config validation: any input is either accepted with valid values or refused
with a ConfigError — never another exception."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ksd.config import RunConfig, _merge
from ksd.errors import ConfigError
from ksd.optim.first_order import SGD
from ksd.optim.lbfgs import LBFGS

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(lr=values, momentum=values, batch_size=values, nesterov=values)
def test_sgd_config_is_valid_or_refused(lr, momentum, batch_size, nesterov):
    node = OmegaConf.create(
        {"name": "sgd", "lr": lr, "momentum": momentum, "batch_size": batch_size, "nesterov": nesterov}
    )
    try:
        config = _merge(SGD.Config, node, "optimizer")
    except ConfigError as err:
        assert str(err).strip() and "\n" not in str(err)
        return
    assert (config.lr > 0 and math.isfinite(config.lr)) or config.lr == math.inf
    assert 0 <= config.momentum < 1
    assert config.batch_size is None or config.batch_size >= 1


def test_misspelled_key_is_named():
    try:
        _merge(RunConfig, OmegaConf.create({"max_epoch": 1}), "run")
    except ConfigError as err:
        assert "unknown key run.max_epoch" in str(err) and "max_epochs" in str(err)
    else:
        raise AssertionError("a misspelled key was accepted")


@settings(max_examples=200, deadline=None)
@given(history=values, c1=values, c2=values)
def test_lbfgs_config_is_valid_or_refused(history, c1, c2):
    node = OmegaConf.create({"name": "lbfgs", "history_size": history, "c1": c1, "c2": c2})
    try:
        config = _merge(LBFGS.Config, node, "optimizer")
    except ConfigError:
        return
    assert config.history_size >= 1 and 0 < config.c1 < config.c2 < 1


@settings(max_examples=200, deadline=None)
@given(max_epochs=values, max_steps=values, max_seconds=values, eval_every=values, extra_key=st.booleans())
def test_run_config_is_valid_or_refused(max_epochs, max_steps, max_seconds, eval_every, extra_key):
    data = {
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "max_seconds": max_seconds,
        "eval_every": eval_every,
    }
    if extra_key:
        data["max_epoch"] = 1  # a misspelling is always refused
    try:
        config = _merge(RunConfig, OmegaConf.create(data), "run")
    except ConfigError as err:
        assert str(err).startswith(("invalid", "unknown key run.", "run.", "set at least one")), err
        return
    assert not extra_key  # a misspelled key is never accepted
    assert any(v is not None for v in (config.max_epochs, config.max_steps, config.max_seconds))
    assert config.eval_every >= 1
    for v in (config.max_epochs, config.max_steps, config.max_seconds):
        assert v is None or v > 0
