"""The SLURM launcher's wait (hydra_plugins.ksd_slurm_launcher): squeue instead of sacct, and a sweep
whose jobs can never start is cancelled with one line. The logic runs here on recorded squeue output;
tests/test_sweeps.py runs it on the local cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hydra_plugins.ksd_slurm_launcher import slurm_launcher as sl


def test_squeue_lines_and_permanent_reasons():
    queue = sl.parse_squeue(
        "12_0|PENDING|PartitionConfig\n12_1|PENDING|ReqNodeNotAvail, UnavailableNodes:n[1-2]\n"
        "12_2|RUNNING|None\n13|PENDING|Priority\n"
    )
    assert queue["12_1"] == ("PENDING", "ReqNodeNotAvail, UnavailableNodes:n[1-2]")
    assert sl.permanent_reason(queue["12_0"]) == "PartitionConfig"
    assert sl.permanent_reason(queue["12_1"]) == "ReqNodeNotAvail"
    assert sl.permanent_reason(queue["12_2"]) is None and sl.permanent_reason(queue["13"]) is None
    assert sl.permanent_reason(None) is None  # gone from the queue: finished, or not known
    assert sl.stuck_reason(queue, ["12_0", "12_1"]) in {"PartitionConfig", "ReqNodeNotAvail"}
    # one job that may still start, or one that is gone, is enough to keep waiting
    assert sl.stuck_reason(queue, ["12_0", "13"]) is None
    assert sl.stuck_reason(queue, ["12_0", "12_2"]) is None
    assert sl.stuck_reason(queue, ["12_0", "14_0"]) is None
    assert set(sl.SETTING) == set(sl.PERMANENT)


def test_partition_config_names_the_request_no_node_has():
    nodes = sl.parse_nodes("2|24105|(null)\n2+|24105|(null)\n")
    assert nodes == [(2, 24105, 0), (2, 24105, 0)]
    advice = sl.partition_config_advice({"cpus_per_task": 8, "gpus_per_node": 0}, "debug", nodes)
    assert "hydra.launcher.cpus_per_task=8 is more than the 2 CPUs" in advice
    assert "at most 2" in advice and "gpus_per_node" not in advice
    advice = sl.partition_config_advice({"cpus_per_task": 1, "gpus_per_node": 1}, "debug", nodes)
    assert "hydra.launcher.gpus_per_node=1 but the nodes of partition debug have no GPUs" in advice
    gpu_nodes = sl.parse_nodes("64|512000|gpu:a100:4(S:0-1)\n")
    assert gpu_nodes == [(64, 512000, 4)]
    advice = sl.partition_config_advice({"cpus_per_task": 8, "gpus_per_node": 8}, "gpu", gpu_nodes)
    assert "gpus_per_node to at most 4" in advice and "cpus_per_task" not in advice
    advice = sl.partition_config_advice({"cpus_per_task": 8, "mem_gb": 1000}, "gpu", gpu_nodes)
    assert "hydra.launcher.mem_gb=1000" in advice


def test_unschedulable_message_is_one_line_naming_reason_and_setting(monkeypatch):
    monkeypatch.setattr(sl, "_run", lambda command: None)  # no SLURM commands here
    line = sl.unschedulable_message("InvalidAccount", {"account": "nope", "partition": "gpu"}, ["7_0", "7_1"])
    assert "\n" not in line
    assert "its 2 jobs (array 7) are pending with reason InvalidAccount" in line
    assert "now cancelled" in line and "hydra.launcher.account (now nope)" in line
    line = sl.unschedulable_message("PartitionTimeLimit", {"timeout_min": 9999, "partition": "gpu"}, ["8"])
    assert "its job (8) is pending" in line and "hydra.launcher.timeout_min (now 9999)" in line


class FakeCluster:
    """squeue answers and a clock that the launcher's sleeps advance."""

    def __init__(self, answers):
        self.answers, self.now, self.polls = answers, 0.0, 0

    def poll(self, job_ids):
        self.polls += 1
        return self.answers(self.now, list(job_ids))

    def sleep(self, seconds):
        self.now += seconds

    def clock(self):
        return self.now


def fake_jobs(tmp_path: Path, ids):
    return [
        SimpleNamespace(job_id=i, paths=SimpleNamespace(result_pickle=tmp_path / f"{i}.pkl")) for i in ids
    ]


def wait(jobs, cluster):
    sl.wait_for_results(jobs, poll=cluster.poll, clock=cluster.clock, sleep=cluster.sleep)


def test_jobs_pending_for_ever_are_given_up_after_the_confirmation_time(tmp_path):
    jobs = fake_jobs(tmp_path, ["5_0", "5_1"])
    cluster = FakeCluster(lambda now, ids: {i: ("PENDING", "PartitionConfig") for i in ids})
    with pytest.raises(sl.Unschedulable) as raised:
        wait(jobs, cluster)
    assert raised.value.reason == "PartitionConfig" and raised.value.job_ids == ["5_0", "5_1"]
    assert sl.CONFIRM_S <= cluster.now <= sl.CONFIRM_S + 10 and cluster.polls >= 3


def test_jobs_that_start_or_wait_for_resources_are_waited_for(tmp_path):
    jobs = fake_jobs(tmp_path, ["5_0", "5_1"])

    def answers(now, ids):
        if now >= 300:  # both finish after five minutes of waiting for resources, then running
            for job in jobs:
                job.paths.result_pickle.touch()
            return {}
        state = ("PENDING", "Resources") if now < 100 else ("RUNNING", "None")
        return {i: state for i in ids}

    cluster = FakeCluster(answers)
    wait(jobs, cluster)
    assert cluster.now >= 300
    # a transient permanent-looking reason that clears before the confirmation time is not fatal
    (tmp_path / "b").mkdir()
    jobs = fake_jobs(tmp_path / "b", ["6_0"])

    def flicker(now, ids):
        if now > 40:
            jobs[0].paths.result_pickle.touch()
            return {}
        return {"6_0": ("PENDING", "ReqNodeNotAvail" if now < sl.CONFIRM_S / 2 else "Resources")}

    wait(jobs, FakeCluster(flicker))


def test_a_job_gone_without_result_ends_the_wait_after_the_others(tmp_path):
    jobs = fake_jobs(tmp_path, ["9_0", "9_1"])

    def answers(now, ids):
        if now > 200:
            jobs[1].paths.result_pickle.touch()
            return {}
        return {"9_1": ("RUNNING", "None")}  # 9_0 was cancelled by hand: gone, no result

    cluster = FakeCluster(answers)
    with pytest.raises(sl.JobsLost) as raised:
        wait(jobs, cluster)
    assert raised.value.args[0] == [jobs[0]] and cluster.now > 200


def test_squeue_failures_are_not_taken_for_gone_jobs(tmp_path):
    jobs = fake_jobs(tmp_path, ["3"])

    def answers(now, ids):
        if now > 600:
            jobs[0].paths.result_pickle.touch()
        return None  # squeue cannot answer (controller restarting)

    wait(jobs, FakeCluster(answers))


@pytest.mark.slow
def test_unschedulable_sweep_on_a_real_cluster_ends_with_one_line(tmp_path, slurm_cluster):
    """The issue's case on the local cluster: slurm_gpu's 8 CPUs per task on nodes with fewer. The jobs
    pend with PartitionConfig; the sweep cancels them and ends with one line and exit status 2."""
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    too_many = max(int(c.rstrip("+")) for c in cpus.split()) + 1
    sweep_dir = tmp_path / "sweep"
    started = time.monotonic()
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("ksd-run")),
            "-m",
            "optimizer=sgd,adam",
            "hydra/launcher=slurm_gpu",
            "hydra.launcher.gpus_per_node=0",
            f"hydra.launcher.cpus_per_task={too_many}",
            "device=cpu",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    elapsed = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("ksd-run: error:")]
    assert result.returncode == sl.EXIT_UNSCHEDULABLE, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(errors) == 1 and "reason PartitionConfig" in errors[0], result.stderr[-2000:]
    assert f"hydra.launcher.cpus_per_task={too_many} is more than" in errors[0]
    assert "sacct" not in result.stdout + result.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s to give up"
    array = next(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
    queue = subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True, timeout=30)
    assert queue.stdout.strip() == "", f"jobs of array {array} are still queued: {queue.stdout}"
    assert not list(sweep_dir.glob("*/summary.json"))  # no job ran
