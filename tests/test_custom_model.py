"""``model=custom``: your own network by its import path, in ``ksd-run``, on your own data."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_cli_errors import assert_clean_failure, assert_no_partial_results, ksd_run
from torch import nn

from ksd.config import validate
from ksd.data import DataSpec
from ksd.errors import ConfigError
from ksd.models import build_model
from ksd.optim import KBFGS, KFAC, LIBRARY
from ksd.runner import REGISTRIES, execute

LABELLED = DataSpec("blobs", (6,), 3, "test")
UNLABELLED = DataSpec("points", (6,), None, "test")
#: A 6-2-6 linear autoencoder as Hydra override values: nested targets, positional arguments.
AUTOENCODER = [
    "model._target_=torch.nn.Sequential",
    "+model._args_=[{_target_: torch.nn.Linear, in_features: 6, out_features: 2},"
    " {_target_: torch.nn.Linear, in_features: 2, out_features: 6}]",
]


def model_config(*overrides: str):
    """The validated model node of ``ksd-run model=custom OVERRIDES`` (SGD: no sparse-init default)."""
    return validate(compose_config("model=custom", "optimizer=sgd", *overrides), REGISTRIES).model


def test_target_and_keyword_arguments_build_the_network():
    cfg = model_config("model._target_=torch.nn.Linear", "+model.in_features=6", "+model.out_features=3")
    assert (cfg.target, cfg.kwargs) == ("torch.nn.Linear", {"in_features": 6, "out_features": 3})
    built = build_model(cfg, LABELLED)
    assert isinstance(built.network, nn.Linear) and built.network.weight.shape == (3, 6)
    assert built.loss.name == "softmax_cross_entropy" and not built.autoencoder
    assert built.description == (
        "custom torch.nn.Linear(in_features=6, out_features=3) (softmax_cross_entropy, default init, "
        "21 parameters)"
    )


def test_unlabelled_data_is_reconstructed_and_nested_targets_are_built():
    built = build_model(model_config(*AUTOENCODER, "model.loss=squared_error"), UNLABELLED)
    assert built.autoencoder and built.loss.name == "squared_error"
    assert [(m.in_features, m.out_features) for m in built.network] == [(6, 2), (2, 6)]
    assert build_model(model_config(*AUTOENCODER), UNLABELLED).loss.name == "sigmoid_cross_entropy"


def test_sparse_init_applies_to_the_custom_network():
    cfg = model_config("model._target_=torch.nn.Linear", "+model.in_features=40", "+model.out_features=3",
                       "model.init=sparse")
    weight = build_model(cfg, DataSpec("wide", (40,), 3, "test")).network.weight
    assert (weight != 0).sum(1).tolist() == [15, 15, 15]


def test_the_fit_check_leaves_the_network_as_built():
    cfg = model_config("model._target_=torch.nn.BatchNorm1d", "+model.num_features=6")
    network = build_model(cfg, UNLABELLED).network
    assert network.training and network.num_batches_tracked.item() == 0  # no update by the dry forward
    assert torch.equal(network.running_mean, torch.zeros(6))


@pytest.mark.parametrize(
    ("overrides", "spec", "fragment"),
    [
        ([], LABELLED, "model=custom needs model._target_="),
        (["model._target_=no_such_package.Net"], LABELLED, "cannot be imported"),
        (["model._target_=torch.nn.Linear", "+model.in_features=6"], LABELLED, "missing 1 required"),
        (["model._target_=torch.nn.Linear", "+model.in_features=6", "+model.out_features=4"], LABELLED,
         "to outputs of shape (4,), but blobs needs (3,)"),
        (["model._target_=torch.nn.Linear", "+model.in_features=5", "+model.out_features=3"], LABELLED,
         "failed on a batch of inputs of shape (6,)"),
        (["model._target_=torch.zeros", "+model.size=[3]"], LABELLED, "built a Tensor, not a torch.nn"),
        (["model._target_=torch.nn.Identity", "model.loss=squared_error"], LABELLED, "needs loss softmax"),
        (["model._target_=torch.nn.Identity", "model.loss=softmax_cross_entropy"], UNLABELLED,
         "reconstructs its inputs"),
    ],
)
def test_networks_that_do_not_fit_are_refused_with_one_sentence(overrides, spec, fragment):
    with pytest.raises(ConfigError) as caught:
        build_model(model_config(*overrides), spec)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_keyword_arguments_are_only_for_custom():
    with pytest.raises(ConfigError, match="are set by model=custom"):
        validate(compose_config("model=mlp", "+model.target=torch.nn.Linear"), REGISTRIES)


class WithNorm(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", [KBFGS, KFAC])
def test_kronecker_methods_refuse_other_layers_by_name(method):
    with pytest.raises(ConfigError, match=r"layer '1' \(LayerNorm\) has parameters"):
        method(WithNorm(), "softmax_cross_entropy")


def test_tied_and_frozen_parameters_are_refused_by_name():
    """One flat trainable copy per parameter would untie tied weights and train frozen ones."""
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(ConfigError, match=r"parameter 2\.weight is shared with another module"):
        LIBRARY["lbfgs"](tied, "squared_error")
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"parameter 0\.weight has requires_grad=False"):
        LIBRARY["sgd"](frozen, "softmax_cross_entropy")


@pytest.mark.parametrize("name", sorted(set(LIBRARY) - {"kbfgs", "kbfgs_l", "kfac"}))
def test_the_other_methods_train_any_differentiable_network(name):
    torch.manual_seed(0)
    network = WithNorm()
    inputs, labels = torch.randn(256, 6), torch.randint(0, 3, (256,))
    before = torch.nn.functional.cross_entropy(network(inputs), labels).item()
    settings = {"lr": 0.1} if name in ("sgd", "adagrad") else {}
    optimizer = LIBRARY[name](network, "softmax_cross_entropy", **settings)
    for _ in range(3):
        optimizer.step(inputs, labels)
    after = torch.nn.functional.cross_entropy(network(inputs), labels).item()
    assert after < before, (before, after)


def test_ksd_run_trains_a_custom_network_on_a_tensors_file(tmp_path):
    """A linear autoencoder (a custom model) on unlabelled data from a .npz file, through ksd-run's path."""
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(300, 2)).astype(np.float32)
    points = codes @ rng.normal(size=(2, 6)).astype(np.float32)  # on a plane in 6-d: a 2-unit code fits
    np.savez(tmp_path / "plane.npz", inputs=points[:250], test_inputs=points[250:])
    cfg = compose_config(
        "dataset=tensors", f"dataset.path={tmp_path / 'plane.npz'}", "dataset.val_size=50",
        "model=custom", *AUTOENCODER, "model.loss=squared_error",
        "optimizer=lbfgs", "run.max_steps=20", "run.eval_every=20", "run.max_seconds=null", "run.plot=false",
    )
    summary = execute(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["status"] == "completed"
    assert summary["data_source"] == f"tensors file {tmp_path / 'plane.npz'}"
    assert float(rows[-1]["test_loss"]) < 1e-3 * float(rows[0]["test_loss"])  # the plane is found
    assert {"train_loss", "val_loss", "test_loss"} <= set(rows[0]) and "test_accuracy" not in rows[0]


def test_cli_unimportable_target_one_line(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((4, 3), np.float32), targets=np.arange(4) % 2)
    result = ksd_run(tmp_path, "dataset=tensors", f"dataset.path={tmp_path / 'd.npz'}", "model=custom",
                     "model._target_=my_models.Net")
    assert_clean_failure(result, "model._target_=my_models.Net cannot be imported", "PYTHONPATH")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert_no_partial_results(tmp_path)
