"""Experiment configs, the per-optimizer grid sweeper, and real sweeps through every launcher.

The launcher tests run `ksd-run -m` in a subprocess on tiny MNIST autoencoders (5 steps each): the
basic launcher, joblib, submitit's local executor and a real SLURM (scripts/local_slurm.sh; skipped
only where `sinfo` is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import CONF, REPO, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hydra_plugins.ksd_grid_sweeper.grid_sweeper import grid_jobs
from ksd.collect import collect, final_rows
from ksd.config import validate
from ksd.errors import ConfigError
from ksd.optim import OPTIMIZERS
from ksd.runner import REGISTRIES
from ksd.scale import SCALES

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
KSD_RUN = str(Path(sys.executable).with_name("ksd-run"))
TINY = [
    "dataset=mnist",
    "model.widths=[16,4]",
    "dataset.train_size=200",
    "dataset.val_size=100",
    "dataset.test_size=100",
    "run.max_epochs=null",
    "run.max_seconds=null",
    "run.eval_every=5",
    "run.eval_train_size=100",
    "run.plot=false",
]
#: Seconds a job of the cpu set costs beyond its training budget (data, model, evaluations), measured
#: on this 2-core machine with the basic launcher (one process per sweep).
JOB_OVERHEAD_S = 8


def sweep_jobs(name: str, scale: str) -> tuple[list[list[str]], object]:
    """The override list of every job of `ksd-run -m +experiment=NAME scale=SCALE`, and the config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", [f"+experiment={name}", f"scale={scale}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    return grid_jobs(overrides, sweeper.grids or {}, sweeper.grid_key), cfg


def test_by_scale_picks_the_value_of_the_scale():
    cpu = validate(compose_config("+experiment=kbfgs_mnist", "scale=cpu", "optimizer=sgd"), REGISTRIES)
    paper = validate(compose_config("+experiment=kbfgs_mnist", "scale=paper", "optimizer=sgd"), REGISTRIES)
    assert (cpu.run.max_seconds, cpu.dataset.train_size, cpu.optimizer.batch_size) == (20, 4000, 500)
    assert (paper.run.max_seconds, paper.dataset.train_size, paper.optimizer.batch_size) == (500, None, 1000)
    epochs = validate(
        compose_config("+experiment=kbfgs_mnist", "scale=paper_epochs", "optimizer=kfac"), REGISTRIES
    )
    # the third value where a config gives one (no time limit, the notebook's epochs), else the paper's
    assert (epochs.run.max_seconds, epochs.run.max_epochs, epochs.dataset.val_size) == (None, 75, 0)
    assert (epochs.dataset.train_size, epochs.optimizer.batch_size) == (None, 1000)
    # the fourth value at cpu_long where a config gives one, else the cpu value
    long = validate(compose_config("+experiment=ksd_mnist", "scale=cpu_long", "optimizer=ksd"), REGISTRIES)
    assert (long.run.max_seconds, long.dataset.train_size, long.dataset.val_size) == (720, 10000, 1000)
    with pytest.raises(ConfigError, match="scale must be one of cpu, cpu_long, paper, paper_epochs"):
        validate(compose_config("+experiment=kbfgs_mnist", "scale=gpu"), REGISTRIES)


def test_grid_sweeper_runs_each_optimizer_with_its_own_grid():
    overrides = OverridesParser.create().parse_overrides(
        ["optimizer=sgd,adam,ksd", "seed=0,1", "run.eval_every=3"]
    )
    grids = {"sgd": {"optimizer.lr": "0.01,0.1", "run.eval_every": 7}, "adam": {"optimizer.eps": 1e-4}}
    jobs = grid_jobs(overrides, grids, "optimizer")
    expected = [
        [f"optimizer={opt}", f"seed={seed}", "run.eval_every=3", *extra]
        for opt, extras in (
            ("sgd", [["optimizer.lr=0.01"], ["optimizer.lr=0.1"]]),
            ("adam", [["optimizer.eps=0.0001"]]),
            ("ksd", [[]]),
        )
        for seed in (0, 1)
        for extra in extras
    ]
    # run.eval_every given by the sweep itself is not overridden by the sgd grid
    assert sorted(jobs) == sorted(expected) and len(jobs) == 8


def test_grid_list_values_stay_single_values():
    overrides = OverridesParser.create().parse_overrides(["optimizer=kbfgs"])
    jobs = grid_jobs(overrides, {"kbfgs": {"optimizer.lr_decay_epochs": [40, 80]}}, "optimizer")
    assert jobs == [["optimizer=kbfgs", "optimizer.lr_decay_epochs=[40,80]"]]


# Every experiment in the slow set (the smoke sets' configs); the default run's data set, ksd_curves, in the
# fast set.
@pytest.mark.parametrize(
    "name", [n if n == "ksd_curves" else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS]
)
def test_experiment_is_a_valid_sweep_at_every_scale(name):
    for scale in SCALES:
        jobs, cfg = sweep_jobs(name, scale)
        assert cfg.experiment.name == name and cfg.experiment.paper and cfg.experiment.figure
        assert cfg.hydra.sweep.dir == f"multirun/{name}-{scale}"
        assert cfg.hydra.sweeper.params.seed == "0,1,2"
        # the same budget for every optimizer: no job changes it
        assert not [o for job in jobs for o in job if o.startswith(("run.max_seconds", "run.max_epochs"))]
        by_optimizer: dict[str, list[list[str]]] = {}
        for job in jobs:
            by_optimizer.setdefault(next(o[10:] for o in job if o.startswith("optimizer=")), []).append(job)
        assert set(by_optimizer) <= set(OPTIMIZERS), set(by_optimizer) - set(OPTIMIZERS)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for its_jobs in by_optimizer.values():
                job = its_jobs[-1]  # the last point of its grid
                validate(compose("config", [f"+experiment={name}", f"scale={scale}", *job]), REGISTRIES)


def test_the_cpu_set_stays_a_smoke_set():
    total = 0.0
    for name in EXPERIMENTS:
        jobs, _ = sweep_jobs(name, "cpu")
        seconds = compose_config(f"+experiment={name}", "scale=cpu", *jobs[0]).run.max_seconds
        assert seconds is not None, f"{name}: scale=cpu needs a wall-time budget"
        total += len(jobs) * (seconds + JOB_OVERHEAD_S)
    # One job after another it took about an hour before NCG, RMSprop, AdaGrad, arcs_cifar10 and arcs_charlm
    # joined it (95 minutes); about half with two joblib workers. Growing it further should be a decision:
    # issue 22 decided to add TRON to four batch-method comparisons (ksd_mnist, ksd_curves,
    # ksd_classification, hf_autoencoders: 15 jobs, 8 minutes), 103 minutes now.
    assert total <= 105 * 60, f"the scale=cpu set needs about {total / 60:.0f} minutes"


def test_slurm_gpu_launcher_selects_cuda_unless_overridden(monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0
    assert launcher.additional_parameters.requeue is True
    assert {"partition", "account", "timeout_min"} <= set(launcher)
    assert cfg.hydra.job.env_set.KSD_DEVICE == "cuda"
    monkeypatch.setenv("KSD_DEVICE", "cuda")  # what Hydra sets in the job (hydra.job.env_set)
    assert compose_config().device == "cuda"
    assert compose_config("device=cpu").device == "cpu"


def run_sweep(tmp_path: Path, data_root: Path, *overrides: str, max_steps: int = 5, timeout: int = 240):
    """Run `ksd-run -m TINY OVERRIDES` into tmp_path/sweep; returns the sweep dir and the log."""
    sweep_dir = tmp_path / "sweep"
    tiny = [*TINY, f"run.max_steps={max_steps}", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "KSD_DATA": str(data_root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [KSD_RUN, "-m", *tiny, *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir, result.stdout + result.stderr


def jobs_of(sweep_dir: Path) -> dict[tuple, tuple[Path, dict]]:
    """Each job's directory and summary, keyed by (optimizer, learning rate, seed) of its config."""
    found = {}
    for path in sweep_dir.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        cfg = OmegaConf.load(path.parent / ".hydra" / "config.yaml")
        found[(cfg.optimizer.name, cfg.optimizer.get("lr"), cfg.seed)] = (path.parent, summary)
    return found


def assert_completed(sweep_dir: Path, expected: set[tuple], steps: int = 5) -> None:
    found = jobs_of(sweep_dir)
    assert set(found) == expected, set(found)
    for key, (job_dir, summary) in found.items():
        assert summary["status"] == "completed" and summary["steps"] == steps, (key, summary)
        rows = pd.read_csv(job_dir / "metrics.csv")
        assert rows["step"].tolist() == [0, steps] and rows["train_loss"].notna().all()


@pytest.mark.slow  # three sweeps; a basic-launcher sweep stays in the fast set (the directory-in-use test)
def test_basic_sweep_failure_skip_and_collect(tmp_path, data_root):
    # max_steps kept out of directory names, so that a changed budget lands in the same directory
    exclude = [
        *OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname.exclude_keys,
        "run.max_steps",
    ]
    common = [
        "optimizer=sgd,adam",
        "hydra.sweeper.grids={sgd:{optimizer.lr:'0.05,-1'}}",
        "logger=wandb",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]",
    ]
    sweep_dir, _ = run_sweep(tmp_path, data_root, *common)
    jobs = jobs_of(sweep_dir)
    bad_dir, bad = jobs.pop(("sgd", -1, 0))
    assert bad["status"] == "failed" and "optimizer.lr" in bad["reason"]
    assert set(jobs) == {("sgd", 0.05, 0), ("adam", 0.001, 0)}
    for job_dir, summary in jobs.values():  # the others ran, each an offline wandb run grouped by sweep
        assert summary["status"] == "completed" and summary["config"]["logger"]["group"] == "sweep"
        assert list((job_dir / "wandb").glob("offline-run-*"))
    status = final_rows(collect([sweep_dir])).set_index("run")["status"]
    assert status[str(bad_dir)] == "failed" and (status == "completed").sum() == 2

    def mtimes() -> dict:
        return {key: (d / "summary.json").stat().st_mtime_ns for key, (d, _) in jobs.items()}

    before = mtimes()
    _, log = run_sweep(tmp_path, data_root, *common)
    assert log.count("skipped:") == 2 and mtimes() == before  # the failed job ran again, the others not
    _, log = run_sweep(tmp_path, data_root, *common, max_steps=6)
    assert log.count("re-running: the configuration differs") == 2 and "skipped:" not in log
    steps = {key: s["steps"] for key, (_, s) in jobs_of(sweep_dir).items() if key[1] != -1}
    assert steps == {("sgd", 0.05, 0): 6, ("adam", 0.001, 0): 6}


@pytest.mark.slow
def test_joblib_sweep(tmp_path, data_root):
    sweep_dir, _ = run_sweep(
        tmp_path, data_root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer=adam", "seed=0,1"
    )
    assert_completed(sweep_dir, {("adam", 0.001, 0), ("adam", 0.001, 1)})


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path, data_root):
    sweep_dir, _ = run_sweep(
        tmp_path,
        data_root,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "optimizer=adam",
        "seed=0,1",
    )
    assert_completed(sweep_dir, {("adam", 0.001, 0), ("adam", 0.001, 1)})


def test_slurm_sweep_on_a_real_cluster(tmp_path, data_root, slurm_cluster):
    """The fast set's SLURM submission: two 5-step jobs through hydra/launcher=slurm_gpu (the cluster
    is started by the slurm_cluster fixture, or the test skips saying why)."""
    sweep_dir, log = run_sweep(
        tmp_path,
        data_root,
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "device=cpu",
        "optimizer=sgd,adam",
        timeout=300,
    )
    assert_completed(sweep_dir, {("sgd", 0.01, 0), ("adam", 0.001, 0)})
    assert list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    assert "sacct" not in log  # the launcher waits on squeue: no sacct warnings without accounting


def test_local_slurm_script_is_idempotent_about_installing():
    script = REPO / "scripts" / "local_slurm.sh"
    assert os.access(script, os.X_OK)
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed")
    result = subprocess.run([str(script), "install"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "already installed" in result.stderr


@pytest.mark.slow
def test_slurm_preempted_job_is_requeued_and_resumes_in_its_own_directory(tmp_path, data_root, slurm_cluster):
    """USR2 (what SLURM sends before a time limit or on preemption): the run checkpoints, submitit
    requeues the job, the requeued job resumes from the checkpoint in the same directory, and it ends
    with exactly the metrics of an uninterrupted run of the same command."""
    env = {**os.environ, "KSD_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    # a step budget and step-based evaluation only, so that both runs are deterministic
    tiny = [o for o in TINY if not o.startswith(("run.max_seconds", "run.eval_every"))]
    overrides = [*tiny, "optimizer=sgd", "run.max_steps=3000", "run.eval_every=200", "run.eval_seconds=null"]
    launcher = [
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
    ]
    sweep_dir = tmp_path / "sweep"
    sweep = subprocess.Popen(
        [KSD_RUN, "-m", *overrides, *launcher, "device=cpu", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not list(sweep_dir.glob("*/metrics.csv"))
            or len(pd.read_csv(next(sweep_dir.glob("*/metrics.csv")))) < 2
        ):
            assert time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        job_id = next(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        assert sweep.wait(timeout=400) == 0
    finally:
        sweep.kill()
    (job_dir,) = [p.parent for p in sweep_dir.glob("*/summary.json")]
    assert json.loads((job_dir / "summary.json").read_text())["status"] == "completed"
    assert "resumed from" in (job_dir / "cli.log").read_text()
    reference_dir = tmp_path / "reference"
    subprocess.run([KSD_RUN, *overrides, "device=cpu", f"hydra.run.dir={reference_dir}"], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=400)
    resumed = pd.read_csv(job_dir / "metrics.csv").drop(columns="wall_time")
    reference = pd.read_csv(reference_dir / "metrics.csv").drop(columns="wall_time")
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)


def _process_group_alive(pgid: int) -> list[int]:
    """Pids of the processes still in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.slow  # killed sweeps
def test_sweep_killed_half_way_reruns_only_the_missing_jobs(tmp_path, data_root):
    """SIGKILL to a joblib sweep and its workers (as a cancelled allocation or the OOM killer's cgroup
    kill) while one job has completed and another is half way: every summary.json left is complete, and
    the same command skips the completed jobs, resumes the interrupted ones from their checkpoints (taking
    over the locks the killed workers left) and runs the rest."""
    sweep_dir = tmp_path / "sweep"
    command = [
        KSD_RUN,
        "-m",
        *[o for o in TINY if not o.startswith(("run.max_seconds", "run.eval_every"))],
        "optimizer=sgd",
        "run.max_seconds=0.3,2,0.4",  # 2 workers: the first job completes, the second is half way
        "run.eval_every=1000000",
        "run.eval_seconds=0.25",
        "run.checkpoint_every=1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "KSD_DATA": str(data_root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, **quiet)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before half way"
            summaries = {p.parent for p in sweep_dir.glob("*/summary.json")}
            resumable = {p.parent for p in sweep_dir.glob("*/checkpoint.pt")} - summaries
            if summaries and resumable:
                break
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    deadline = time.monotonic() + 30
    while _process_group_alive(sweep.pid):  # the workers die with the group
        assert time.monotonic() < deadline, _process_group_alive(sweep.pid)
        time.sleep(0.1)

    done_before = {}
    for path in sweep_dir.glob("*/summary.json"):  # complete JSON, never a half-written file
        assert json.loads(path.read_text())["status"] == "completed"
        done_before[path.parent] = path.stat().st_mtime_ns
    interrupted = {p.parent for p in sweep_dir.glob("*/checkpoint.pt")} - set(done_before)
    assert done_before and interrupted
    assert any((d / ".ksd-run.lock").exists() for d in interrupted)  # left by the killed workers

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {p.parent: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert len(jobs) == 3 and all(s["status"] == "completed" for s in jobs.values()), jobs
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in done_before} == done_before  # not re-run
    for job_dir in jobs:
        steps = pd.read_csv(job_dir / "metrics.csv")["step"].tolist()
        assert steps == sorted(set(steps)) and steps[0] == 0, (job_dir, steps)  # no duplicated rows
        assert not list(job_dir.glob(".*.tmp")) and not (job_dir / ".ksd-run.lock").exists()
        assert not (job_dir / "checkpoint.pt").exists()
    for job_dir in interrupted:
        assert "resumed from" in (job_dir / "cli.log").read_text()


def test_sweep_job_whose_directory_is_in_use_is_refused_and_the_sweep_goes_on(tmp_path, data_root):
    """A job requeued while its earlier instance still runs: it refuses without touching the earlier
    instance's files (Hydra still rewrites its own .hydra/ copy of the same config), the others run."""
    sweep_dir = tmp_path / "sweep"
    busy = sweep_dir / "job1"
    busy.mkdir(parents=True)
    (busy / "metrics.csv").write_text("step,train_loss\n0,1.0\n")
    (busy / "summary.json").write_text('{"status": "interrupted"}')
    before = {name: (busy / name).read_bytes() for name in ("metrics.csv", "summary.json")}
    hold = "import sys, time; from ksd.lock import acquire; acquire(sys.argv[1]); print('held', flush=True); "
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "time.sleep(99)", str(busy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        _, log = run_sweep(tmp_path, data_root, "optimizer=adam", "seed=0,1", "hydra.sweep.subdir=job${seed}")
        assert f"{busy} is in use by another run (pid {holder.pid} on host" in log
        assert {name: (busy / name).read_bytes() for name in before} == before
        assert json.loads((busy / ".ksd-run.lock").read_text())["pid"] == holder.pid
        assert json.loads((sweep_dir / "job0" / "summary.json").read_text())["status"] == "completed"
    finally:
        holder.kill()
        holder.wait()
