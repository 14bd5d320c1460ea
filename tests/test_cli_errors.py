"""Bad input to `ksd-run`: one clear line on stderr, a non-zero exit, no traceback, no partial results."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KSD_RUN = [sys.executable, "-m", "ksd.cli"]


def ksd_run(tmp_path: Path, *overrides: str, data: Path | None = None) -> subprocess.CompletedProcess:
    env_data = str(data) if data is not None else str(tmp_path / "no-data-here")
    out = tmp_path / "out"
    return subprocess.run(
        [*KSD_RUN, f"hydra.run.dir={out}", "run.max_steps=1", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={"KSD_DATA": env_data, "PATH": "/usr/bin:/bin"},
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    text = result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in text, text
    return text


def assert_no_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not (out / "metrics.csv").exists()
    leftovers = [p for p in out.rglob("*.tmp")] if out.exists() else []
    assert not leftovers
    if (out / "summary.json").exists():  # complete JSON saying what went wrong
        assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_unknown_optimizer_lists_choices(tmp_path):
    text = assert_clean_failure(
        ksd_run(tmp_path, "optimizer=newton"), "optimizer/newton", "sgd", "adam", "lbfgs"
    )
    assert "Available options" in text


def test_unknown_dataset_and_model_list_choices(tmp_path):
    assert_clean_failure(ksd_run(tmp_path, "dataset=imagenet"), "mnist", "cifar10", "curves")
    assert_clean_failure(ksd_run(tmp_path, "model=transformer"), "autoencoder", "mlp", "cnn")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("+optimizer.lrr=0.1", "unknown key optimizer.lrr"),
        ("run.eval_every=0", "run.eval_every must be >= 1"),
        ("device=tpu", "device must be"),
    ],
)
def test_bad_values_give_one_sentence(tmp_path, override, fragment):
    result = ksd_run(tmp_path, "optimizer=sgd", override)
    assert_clean_failure(result, fragment)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert_no_partial_results(tmp_path)


def test_misspelled_override_key_is_refused(tmp_path):
    assert_clean_failure(ksd_run(tmp_path, "optimizer.lrr=0.1"), "optimizer.lrr")


def test_missing_data_directory(tmp_path):
    result = ksd_run(tmp_path, "dataset=mnist", "model=mlp")
    assert_clean_failure(result, "MNIST", str(tmp_path / "no-data-here"))
    assert_no_partial_results(tmp_path)


def test_truncated_data_file(tmp_path, data_root):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").iterdir():
        shutil.copy(f, raw / f.name)
    images = raw / "t10k-images-idx3-ubyte.gz"
    with gzip.open(images, "rb") as f:
        content = f.read()
    with gzip.open(images, "wb") as f:
        f.write(content[: len(content) // 3])
    result = ksd_run(tmp_path, "dataset=mnist", "model=mlp", data=tmp_path / "data")
    assert_clean_failure(result, "t10k-images-idx3-ubyte")
    assert_no_partial_results(tmp_path)


def test_model_that_does_not_fit_the_data(tmp_path, data_root):
    result = ksd_run(
        tmp_path, "dataset=cifar10", "model=autoencoder", "dataset.train_size=100", data=data_root
    )
    assert_clean_failure(result, "autoencoder", "cifar10")
    assert_no_partial_results(tmp_path)


def test_batch_larger_than_training_set(tmp_path, data_root):
    result = ksd_run(
        tmp_path,
        "dataset=mnist",
        "model=mlp",
        "dataset.train_size=50",
        "optimizer=sgd",
        "optimizer.batch_size=100",
        data=data_root,
    )
    assert_clean_failure(result, "batch_size=100 is larger than the 50 training examples")
    assert_no_partial_results(tmp_path)


def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_failure(ksd_run(tmp_path, "device=cuda"), "CUDA is not available")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optimizer=ksd", "optimizer.krylov_dim=0"], "optimizer.krylov_dim"),
        (["optimizer=lbfgs", "optimizer.history_size=0"], "optimizer.history_size must be >= 1"),
        (["optimizer=arcs_lsr1", "optimizer.history_size=0"], "optimizer.history_size"),
        (["optimizer=kbfgs_l", "optimizer.history_size=0"], "optimizer.history_size"),
        (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum must be in [0, 1)"),
        (["dataset.val_size=-5"], "dataset.val_size must be >= 0"),
        (["run.max_epochs=null", "run.max_steps=null", "run.max_seconds=null"], "set at least one of"),
        (["seed=abc"], "seed"),
    ],
)
def test_out_of_range_values(tmp_path, overrides, fragment):
    result = ksd_run(tmp_path, *overrides)
    assert_clean_failure(result, fragment)
    assert_no_partial_results(tmp_path)


def test_wrong_format_data_file(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"this is not an IDX file at all" * 10)
    result = ksd_run(tmp_path, "dataset=mnist", "model=mlp", data=tmp_path / "data")
    assert_clean_failure(result, "train-images-idx3-ubyte")
    assert_no_partial_results(tmp_path)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [*KSD_RUN, f"hydra.run.dir={blocker}/out", "run.max_steps=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert_clean_failure(result, "cannot write results to", str(blocker))
