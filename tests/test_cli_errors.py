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


def assert_one_line_of_ours(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """Hydra's own error block and its HYDRA_FULL_ERROR hint replaced by one `ksd-run: error:` line."""
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ksd-run: error: "), result.stderr
    assert "HYDRA_FULL_ERROR" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


def test_unknown_optimizer_lists_choices(tmp_path):
    line = assert_one_line_of_ours(ksd_run(tmp_path, "optimizer=newton"))
    assert "optimizer=newton is not an option; available options for optimizer: " in line
    assert all(name in line for name in ("sgd", "adam", "lbfgs", "ksd"))
    assert_no_partial_results(tmp_path)


def test_unknown_dataset_and_model_list_choices(tmp_path):
    line = assert_one_line_of_ours(ksd_run(tmp_path, "dataset=imagenet"))
    assert "dataset=imagenet is not an option" in line
    assert all(d in line for d in ("mnist", "cifar10", "curves"))
    line = assert_one_line_of_ours(ksd_run(tmp_path, "model=transformer"))
    assert "model=transformer is not an option" in line
    assert all(m in line for m in ("autoencoder", "mlp", "cnn"))


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
    line = assert_one_line_of_ours(ksd_run(tmp_path, "optimizer=sgd", "optimizer.lrr=0.1"))
    assert line.startswith("ksd-run: error: unknown key optimizer.lrr; valid keys under optimizer: name,")
    assert ", lr, momentum," in line
    assert_no_partial_results(tmp_path)


KSD_RUN_SCRIPT = str(Path(sys.executable).with_name("ksd-run"))  # the console script itself


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.checkpoint_evry=1"], "unknown key run.checkpoint_evry; valid keys under run: max_epochs,"),
        (["run.max_steps.x=1"], "unknown key run.max_steps.x; run.max_steps has no keys under it."),
        (["~run.checkpoint_evry"], "cannot delete run.checkpoint_evry: there is no such key; valid keys"),
        (["sed=1"], "unknown key sed; valid top-level keys: hydra, dataset, model, optimizer,"),
        (["run.max_steps=[1"], "cannot parse the overrides: no viable alternative at input '[1'"),
        (["-m", "hydra.sweep.dir=SWEEP", "seed=0,1", "run.checkpoint_evry=1,2"], "unknown key run.checkp"),
    ],
    ids=["misspelled", "below-a-value", "delete-missing", "top-level", "syntax", "sweep"],
)
def test_hydra_errors_end_in_one_line_of_ours(tmp_path, overrides, expected):
    """Errors Hydra reports itself (before our validation) through the installed console script."""
    out = tmp_path / "out"
    flags = [o for o in overrides if o.startswith("-")]
    overrides = [o.replace("SWEEP", str(out)) for o in overrides if not o.startswith("-")]
    result = subprocess.run(
        [KSD_RUN_SCRIPT, *flags, f"hydra.run.dir={out}", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        env={"KSD_DATA": str(tmp_path / "no-data-here"), "PATH": "/usr/bin:/bin"},
    )
    line = assert_one_line_of_ours(result)
    assert expected in line, line
    if "valid keys under run" in line:
        assert "checkpoint_every" in line and "skip_completed" in line
    assert not out.exists() or (not list(out.rglob("*.json")) and not list(out.rglob("*.csv")))


def test_hydra_full_error_still_gives_hydras_own_report(tmp_path):
    """HYDRA_FULL_ERROR=1 is the documented way to the full traceback: we do not swallow it."""
    result = subprocess.run(
        [KSD_RUN_SCRIPT, f"hydra.run.dir={tmp_path / 'out'}", "run.checkpoint_evry=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HYDRA_FULL_ERROR": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "ksd-run: error" not in result.stderr


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
