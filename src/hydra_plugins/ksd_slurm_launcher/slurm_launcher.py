"""hydra-submitit-launcher's SLURM launcher, waiting on ``squeue`` and giving up on jobs that cannot start.

The plugin submits a sweep as one job array, then waits for each job's result file and asks ``sacct``
for the jobs' states every few seconds. Two things go wrong with that:

- A job that asks for more than any node of its partition has (``cpus_per_task: 8`` on 2-CPU nodes),
  or for an account or QOS the user cannot use, is accepted by ``sbatch`` and then pends for ever, with
  a reason such as ``PartitionConfig``; the sweep waits for ever.
- A cluster without an accounting database (``AccountingStorageType=accounting_storage/none``, as the
  one of ``scripts/local_slurm.sh``) has no ``sacct``: every poll prints submitit's "Bypassing sacct
  error" warning.

:class:`SlurmLauncher` (``_target_`` of ``conf/hydra/launcher/slurm_gpu.yaml``) submits exactly as the
plugin does, then polls ``squeue``, which needs no accounting, so ``sacct`` is never called while jobs
wait. When every job still waiting has been pending for :data:`CONFIRM_S` seconds with a reason that
waiting cannot clear (:data:`PERMANENT`), it cancels the sweep's jobs and ends with one line naming the
reason and the setting to change, exit status 2. A job that leaves the queue without writing a result
(cancelled, killed with its node) ends the sweep, once the other jobs are done, with one line naming it
and its log, exit status 1; re-running the same command re-runs or resumes it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_UNSCHEDULABLE = 2  # a setting of the sweep is wrong (as ksd-run's exit status for bad input)
EXIT_JOB_LOST = 1
#: Seconds every waiting job must stay pending for a permanent reason before the sweep is cancelled
#: (a reason is re-evaluated by the scheduler; one poll is not enough to be sure).
CONFIRM_S = 10.0
#: Seconds a job may be gone from the queue before its result file must be there (a shared file system
#: may show the file late).
GONE_GRACE_S = 60.0

#: Pending reasons that waiting does not clear, each with what it means (``{partition}`` is filled in).
PERMANENT: dict[str, str] = {
    "PartitionConfig": "they ask for more than a node of partition {partition} has",
    "ReqNodeNotAvail": "a node they need is down, drained or reserved",
    "InvalidAccount": "the account is not one this user can charge",
    "InvalidQOS": "the QOS is not one this user can use",
    "PartitionTimeLimit": "their time limit is above partition {partition}'s",
    "PartitionNodeLimit": "they ask for more nodes than partition {partition} allows",
    "BadConstraints": "no node satisfies their constraints",
    "QOSMaxWallDurationPerJobLimit": "their time limit is above the QOS's limit per job",
    "QOSMaxCpuPerJobLimit": "they ask for more CPUs than the QOS allows per job",
    "QOSMaxGRESPerJob": "they ask for more GPUs than the QOS allows per job",
    "QOSMaxMemoryPerJob": "they ask for more memory than the QOS allows per job",
    "QOSMaxNodePerJobLimit": "they ask for more nodes than the QOS allows per job",
    "AssocMaxWallDurationPerJobLimit": "their time limit is above the account's limit per job",
    "AssocMaxCpuPerJobLimit": "they ask for more CPUs than the account allows per job",
    "AssocMaxNodePerJobLimit": "they ask for more nodes than the account allows per job",
}
#: The launcher setting to change for each reason (PartitionConfig is worked out from the nodes).
SETTING: dict[str, str] = {
    "PartitionConfig": "hydra.launcher.cpus_per_task, gpus_per_node or mem_gb, or hydra.launcher.partition",
    "ReqNodeNotAvail": "hydra.launcher.partition (or constraint)",
    "InvalidAccount": "hydra.launcher.account",
    "InvalidQOS": "hydra.launcher.qos",
    "PartitionTimeLimit": "hydra.launcher.timeout_min",
    "PartitionNodeLimit": "hydra.launcher.nodes",
    "BadConstraints": "hydra.launcher.constraint",
    "QOSMaxWallDurationPerJobLimit": "hydra.launcher.timeout_min",
    "QOSMaxCpuPerJobLimit": "hydra.launcher.cpus_per_task",
    "QOSMaxGRESPerJob": "hydra.launcher.gpus_per_node",
    "QOSMaxMemoryPerJob": "hydra.launcher.mem_gb",
    "QOSMaxNodePerJobLimit": "hydra.launcher.nodes",
    "AssocMaxWallDurationPerJobLimit": "hydra.launcher.timeout_min",
    "AssocMaxCpuPerJobLimit": "hydra.launcher.cpus_per_task",
    "AssocMaxNodePerJobLimit": "hydra.launcher.nodes",
}


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue -h -r -o '%i|%T|%r'`` (one line per array task)."""
    queue = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[0]:
            queue[parts[0]] = (parts[1].strip(), parts[2].strip())
    return queue


def permanent_reason(entry: tuple[str, str] | None) -> str | None:
    """The reason of a job pending for ever (``ReqNodeNotAvail, UnavailableNodes:n1`` gives
    ``ReqNodeNotAvail``), or None for a job that is gone, running or may still start."""
    if entry is None:
        return None
    state, reason = entry
    code = reason.split(",")[0].strip()
    return code if state == "PENDING" and code in PERMANENT else None


def stuck_reason(queue: Mapping[str, tuple[str, str]], waiting: Sequence[str]) -> str | None:
    """The reason (the most common one) when every job in ``waiting`` pends for a permanent reason."""
    reasons = [permanent_reason(queue.get(job_id)) for job_id in waiting]
    if not reasons or None in reasons:
        return None
    return max(set(reasons), key=reasons.count)


def _gpus(gres: str) -> int:
    """GPUs of a node from sinfo's ``%G`` (``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``)."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def parse_nodes(text: str) -> list[tuple[int, int, int]]:
    """``[(cpus, memory MB, gpus)]`` per node from ``sinfo -h -N -o '%c|%m|%G'``."""
    nodes = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0].rstrip("+").isdigit():
            memory = parts[1].rstrip("+")
            nodes.append((int(parts[0].rstrip("+")), int(memory) if memory.isdigit() else 0, _gpus(parts[2])))
    return nodes


def partition_config_advice(
    params: Mapping[str, Any], partition: str, nodes: list[tuple[int, int, int]]
) -> str:
    """Which request no node of ``partition`` can hold, and the setting to change."""
    if not nodes:
        return f"lower {SETTING['PartitionConfig']}"
    tasks = int(params.get("tasks_per_node") or 1)
    cpus = int(params.get("cpus_per_task") or 1) * tasks
    gpus = int(params.get("gpus_per_node") or 0)
    mem_gb = params.get("mem_gb")
    most_cpus = max(n[0] for n in nodes)
    most_gpus = max(n[2] for n in nodes)
    most_mem = max(n[1] for n in nodes)
    fits = [n for n in nodes if n[0] >= cpus and n[2] >= gpus and (mem_gb is None or n[1] >= mem_gb * 1024)]
    too_much = []
    if cpus > most_cpus:
        per = f" x {tasks} tasks" if tasks > 1 else ""
        too_much.append(
            f"hydra.launcher.cpus_per_task={params.get('cpus_per_task')}{per} is more than the "
            f"{most_cpus} CPUs of partition {partition}'s largest node: set hydra.launcher.cpus_per_task "
            f"to at most {max(most_cpus // tasks, 1)}"
        )
    if gpus > most_gpus:
        have = f"at most {most_gpus} GPUs" if most_gpus else "no GPUs"
        fix = f"at most {most_gpus}" if most_gpus else "0 (with device=cpu)"
        too_much.append(
            f"hydra.launcher.gpus_per_node={gpus} but the nodes of partition {partition} have {have}: set "
            f"hydra.launcher.gpus_per_node to {fix} or pick a GPU partition with hydra.launcher.partition"
        )
    if mem_gb is not None and most_mem and mem_gb * 1024 > most_mem:
        too_much.append(
            f"hydra.launcher.mem_gb={mem_gb} is more than the {most_mem / 1024:.0f} GB of partition "
            f"{partition}'s largest node: set hydra.launcher.mem_gb to at most {most_mem // 1024}"
        )
    if too_much:
        return "; ".join(too_much)
    if not fits:
        return (
            f"no single node has {cpus} CPUs, {gpus} GPUs and {mem_gb} GB together: lower "
            f"{SETTING['PartitionConfig']}"
        )
    return f"change {SETTING['PartitionConfig']}"


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("%s failed: %s", command[0], err)
        return None


def default_partition() -> str:
    found = _run(["sinfo", "-h", "-o", "%P"])
    for name in (found.stdout.split() if found and found.returncode == 0 else []):
        if name.endswith("*"):
            return name[:-1]
    return "(default)"


def unschedulable_message(reason: str, params: Mapping[str, Any], job_ids: Sequence[str]) -> str:
    """The one line that ends a sweep whose jobs all pend for ``reason``."""
    partition = params.get("partition") or default_partition()
    meaning = PERMANENT[reason].format(partition=partition)
    if reason == "PartitionConfig":
        found = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%c|%m|%G"])
        nodes = parse_nodes(found.stdout) if found and found.returncode == 0 else []
        advice = partition_config_advice(params, partition, nodes)
    else:
        key = SETTING[reason]
        current = key.split(" ")[0].removeprefix("hydra.launcher.").rstrip(",")
        value = params.get(current)
        advice = f"change {key}" + (f" (now {value})" if value is not None else "")
    n = len(job_ids)
    arrays = ", ".join(_bases(job_ids))
    jobs = f"its job ({job_ids[0]}) is" if n == 1 else f"its {n} jobs (array {arrays}) are"
    return (
        f"SLURM cannot start this sweep: {jobs} pending with reason {reason} ({meaning}), now cancelled; "
        f"{advice}."
    )


def _bases(job_ids: Sequence[str]) -> list[str]:
    """The job (array) ids to ``scancel``: ``12_0, 12_1`` are array 12."""
    return sorted({job_id.split("_")[0] for job_id in job_ids}, key=lambda s: (len(s), s))


def squeue(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """States and reasons of the queued jobs among ``job_ids`` (None when squeue cannot answer)."""
    found = _run(["squeue", "-h", "-r", "-j", ",".join(_bases(job_ids)), "-o", "%i|%T|%r"])
    if found is None:
        return None
    if found.returncode != 0:
        if "Invalid job id" in found.stderr:  # every job has ended and been purged from the controller
            return {}
        log.debug("squeue failed: %s", found.stderr.strip())
        return None
    return parse_squeue(found.stdout)


def _accounting_state(job_id: str) -> str:
    """The job's final state from sacct, or '' on a cluster without accounting (no warning printed)."""
    found = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if found is None or found.returncode != 0:
        return ""
    lines = found.stdout.split()
    return lines[-1] if lines else ""


class Unschedulable(Exception):
    """Every job of the sweep pends for a reason that waiting cannot clear."""

    def __init__(self, reason: str, job_ids: Sequence[str]) -> None:
        super().__init__(reason)
        self.reason, self.job_ids = reason, list(job_ids)


class JobsLost(Exception):
    """Jobs left the queue without writing a result."""


def wait_for_results(
    jobs: Sequence[Any],
    *,
    poll: Callable[[Sequence[str]], dict[str, tuple[str, str]] | None] = squeue,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until every job (a submitit ``Job``) has its result file.

    Raises :class:`Unschedulable` when every job still waiting has pended for a permanent reason for
    :data:`CONFIRM_S` seconds, and :class:`JobsLost` once the other jobs are done when some left the
    queue without a result for :data:`GONE_GRACE_S` seconds.
    """
    start = clock()
    stuck_since: float | None = None
    gone_since: dict[str, float] = {}
    lost: list[Any] = []
    while True:
        waiting = [j for j in jobs if j not in lost and not Path(j.paths.result_pickle).exists()]
        if not waiting:
            break
        now = clock()
        queue = poll([j.job_id for j in waiting])
        if queue is not None:
            reason = stuck_reason(queue, [j.job_id for j in waiting])
            if reason is None:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = now
            elif now - stuck_since >= CONFIRM_S:
                raise Unschedulable(reason, [j.job_id for j in waiting])
            for job in waiting:
                if job.job_id in queue:
                    gone_since.pop(job.job_id, None)
                elif now - gone_since.setdefault(job.job_id, now) >= GONE_GRACE_S:
                    lost.append(job)
        # as often as submitit polls sacct: every 2 s at first, at most every 30 s later on
        sleep(min(30.0, max(2.0, (now - start) / 4)))
    if lost:
        raise JobsLost(lost)


try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SubmititSlurmLauncher,
    )
except ImportError:  # the [slurm] extra is not installed: no launcher (slurm_gpu.yaml says how to install)
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, filter_overrides
    from omegaconf import OmegaConf

    class SlurmLauncher(_SubmititSlurmLauncher):
        """submitit's SLURM launcher (same parameters, same submission) with :func:`wait_for_results`."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            # The body of hydra_submitit_launcher's BaseSubmititLauncher.launch (1.2), but for the wait.
            import submitit
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

            assert self.config is not None
            assert len(job_overrides) > 0
            init_params = {"folder": self.params["submitit_folder"]}
            specific_init_keys = {"max_num_timeout"}
            init_params.update(
                **{f"{self._EXECUTOR}_{x}": y for x, y in self.params.items() if x in specific_init_keys}
            )
            init_keys = specific_init_keys | {"submitit_folder"}
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
            baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
            params = {
                x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                for x, y in self.params.items()
                if x not in init_keys
            }
            executor.update_parameters(**params)
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            job_params: list[Any] = []
            for idx, overrides in enumerate(job_overrides):
                idx = initial_job_idx + idx
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_params.append(
                    (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
                )
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
            try:
                wait_for_results(jobs)
            except Unschedulable as err:
                subprocess.run(["scancel", *_bases(err.job_ids)], capture_output=True, timeout=60)
                print(f"ksd-run: error: {unschedulable_message(err.reason, self.params, err.job_ids)}",
                      file=sys.stderr)
                sys.exit(EXIT_UNSCHEDULABLE)
            except JobsLost as err:
                (lost,) = err.args
                names = []
                for job in lost:
                    state = _accounting_state(job.job_id)
                    names.append(f"{job.job_id}{f' ({state})' if state else ''}, log {job.paths.stderr}")
                print(
                    f"ksd-run: error: SLURM job{'s' if len(lost) > 1 else ''} {'; '.join(names)} left the "
                    "queue without a result (cancelled, timed out or killed); the other jobs are done, and "
                    "the same command re-runs or resumes the missing ones.",
                    file=sys.stderr,
                )
                sys.exit(EXIT_JOB_LOST)
            # every result file is there, so results() reads it without asking sacct
            return [j.results()[0] for j in jobs]
