"""Grid workers as submitit jobs: ``--launcher slurm`` (one Slurm job array) and ``--launcher local``.

The invocation prepares the grid as always (experiment, teachers, parent run, queue); each job
then runs one :class:`~benchmark.runner.Worker` on the shared queue, exactly as a worker process
or a second machine would.  ``slurm`` submits ``N`` workers as one job array and returns its id;
``local`` runs them through submitit's :class:`~submitit.LocalExecutor` on this machine and waits
(it is what the test suite runs, since no Slurm is at hand).

A job preempted or timed out is requeued by submitit (:class:`submitit.helpers.Checkpointable`):
the cell it was running goes back into the queue (or, after SIGKILL, is retried once its
heartbeat is stale) and resumes from its last checkpoint (``<results>/checkpoints/<grid>/``, so
the results folder must be shared by the machines), continuing its MLflow run.  Needs the ``dfkd-bench[slurm]`` extra (submitit); imported only for these launchers.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.core.errors import DfkdError

try:
    import submitit
except ImportError:  # pragma: no cover (the [slurm] extra is missing)
    submitit = None

from .runner import RunnerConfig

LAUNCHERS = ("processes", "local", "slurm")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(text: str) -> int:
    """Slurm's ``--time`` formats (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes (≥ 1)."""
    match = _TIME.match(text.strip())
    if not match:
        raise DfkdError(f"bad --slurm-time {text!r}; expected minutes or Slurm's [D-]HH:MM[:SS], e.g. 4:00:00 or 1-12:00:00")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = ((int(days) * 24 + int(a)) * 60 + int(b or 0)) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = (int(a) * 60 + int(b)) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    if seconds <= 0:
        raise DfkdError(f"bad --slurm-time {text!r}; it must be longer than 0")
    return max(1, -(-seconds // 60))


@dataclass(frozen=True)
class SlurmOptions:
    """What the Slurm job array asks for."""

    partition: str | None = None
    gpus_per_task: int | None = None
    time: str = "4:00:00"
    cpus_per_task: int | None = None


def _require_submitit(launcher: str) -> Any:
    if submitit is None:
        raise DfkdError(f"--launcher {launcher} needs submitit, which is not installed; "
                        "install it with: pip install 'dfkd-bench[slurm]'")
    return submitit


def check_launcher(launcher: str, slurm: SlurmOptions | None) -> None:
    """Bad launcher options as one line, before anything is written."""
    if launcher not in LAUNCHERS:
        raise DfkdError(f"unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    if launcher != "processes":
        sub = _require_submitit(launcher)
        parse_slurm_time((slurm or SlurmOptions()).time)
        if launcher == "slurm" and not sub.SlurmExecutor.affinity() > 0:
            raise DfkdError("--launcher slurm needs Slurm's srun and sbatch on PATH; run it on the cluster's login node")


def make_executor(launcher: str, folder: Path, workers: int, grid: str, slurm: SlurmOptions | None = None) -> Any:
    """The submitit executor of ``launcher`` (``local`` or ``slurm``), parameters set, nothing submitted."""
    sub = _require_submitit(launcher)
    slurm = slurm or SlurmOptions()
    minutes = parse_slurm_time(slurm.time)
    if launcher == "slurm":
        executor = sub.SlurmExecutor(folder=folder)
        params: dict[str, Any] = {"job_name": f"dfkd-{grid}", "time": minutes, "array_parallelism": workers,
                                  "signal_delay_s": 120}
        if slurm.partition:
            params["partition"] = slurm.partition
        if slurm.gpus_per_task:
            params["gpus_per_task"] = slurm.gpus_per_task
        if slurm.cpus_per_task:
            params["cpus_per_task"] = slurm.cpus_per_task
        executor.update_parameters(**params)
        return executor
    if launcher == "local":
        executor = sub.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=minutes, signal_delay_s=30)
        return executor
    raise DfkdError(f"unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")


class WorkerJob(submitit.helpers.Checkpointable if submitit is not None else object):  # type: ignore[misc]
    """One grid worker as a submitit job; requeued as it is when preempted or timed out."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config

    def __call__(self, index: int) -> int:
        import optuna
        import torch

        from .cpu_tuning import tune_malloc
        from .runner import Worker

        tune_malloc()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        from methods.core.errors import SliceEnded

        try:
            Worker(self.config, index).run()
        except SliceEnded:  # --stop-after: the cell checkpointed; the next invocation continues it
            pass
        return index


def submit_workers(executor: Any, config: RunnerConfig, workers: int) -> list[Any]:
    """Submit ``workers`` worker jobs as one batch (a Slurm job array; separate local jobs)."""
    with executor.batch():
        jobs = [executor.submit(WorkerJob(config), i) for i in range(workers)]
    return jobs


def array_id(jobs: list[Any]) -> str:
    """The Slurm job array's id (``1234`` of ``1234_0``)."""
    return str(jobs[0].job_id).split("_")[0]


def wait_jobs(jobs: list[Any], poll: float = 0.5) -> list[str]:
    """Wait for local jobs; on Ctrl-C / SIGTERM cancel them (their cells are marked KILLED and re-queued).

    Returns one line per job that raised.
    """
    try:
        while not all(job.done() for job in jobs):
            time.sleep(poll)
    except KeyboardInterrupt:
        for job in jobs:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        deadline = time.time() + 60
        while time.time() < deadline and not all(job.done() for job in jobs):
            time.sleep(poll)
        raise
    errors = []
    for job in jobs:
        error = job.exception()
        if error is not None:
            errors.append(f"worker job {job.job_id} failed: {str(error).strip().splitlines()[-1][:300]}")
    return errors
