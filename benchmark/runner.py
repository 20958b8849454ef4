"""The grid runner: cells as Optuna trials on a shared storage, each cell recorded as an MLflow run.

Coordination uses Optuna's storage as the work queue instead of a home-made one: every cell not
yet finished in MLflow is enqueued as a WAITING trial (its resolved configuration in the
trial's user attributes); workers pop trials (WAITING → RUNNING is atomic in the storage), keep
a heartbeat while they run, and tell the outcome.  A worker that dies (SIGKILL, lost machine)
stops beating; after the grace period any worker fails its trial and
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` enqueues it again, and the stale MLflow
run is marked KILLED before the cell re-runs.  Several processes, or several machines running
the same command against one RDB storage and one MLflow server, split the grid.

MLflow is the record of what finished: re-running a grid skips cells with a FINISHED run and
re-runs failed, killed or never-started ones.  A cell checkpoints to
``<results>/checkpoints/<grid>/<cell_id>.pt`` at each evaluation and stage boundary; an
interrupted cell (SIGKILL, ``--stop-after``, a lost machine) resumes from it and continues its
own MLflow run (metric steps go on; one run per cell).  The checkpoint is removed when the cell
finishes.  The queue study is named after the grid and the
hash of its cell set, so the same grid resumes the same queue and an edited grid gets a new one.

The queue itself (storage, heartbeats, SQLite locking) is :mod:`benchmark.workqueue`.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import TrialState

from methods.core.accounting import ACCOUNTING_KEYS
from methods.core.api import TaskData
from methods.core.checkpoint import CheckpointConfig
from methods.core.context import BaseCallback
from methods.core.errors import EXIT_SLICE_ENDED, DfkdError, SliceEnded

from . import teacher_store, tracking
from .cpu_tuning import tune_malloc
from .data import load_task
from .experiment import load_data
from .grid import Cell, Plan
from .settings import Settings
from .stores import check_stores, redact
from .teachers import default_recipe, read_manifest, teacher_dir, timed_train
from .workqueue import DEFAULT_HEARTBEAT, default_storage, fail_stale, open_storage

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

PROGRESS_EVERY = 2.0  # seconds between progress reports of a running cell
Echo = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the running cell is marked KILLED and the grid stops."""


class CellFailed(Exception):
    """A cell raised (its run is FAILED with error.txt); the grid goes on."""


# ----------------------------------------------------------------------------- the queue
def study_name(plan: Plan) -> str:
    return f"grid:{plan.grid.name}:{plan.digest}"


class Liveness:
    """Whether the process behind a RUNNING MLflow cell run is still alive, from its queue trial."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self._states: dict[str, dict[int, TrialState]] = {}

    def __call__(self, run: Run) -> bool:
        tags = run.data.tags
        if tags.get(tracking.KIND) == "grid":
            return True  # parent runs are judged by their own heartbeat
        name, number = tags.get(tracking.QUEUE_STUDY), tags.get(tracking.QUEUE_TRIAL)
        if not name or number is None:
            return False
        if name not in self._states:
            try:
                study = optuna.load_study(study_name=name, storage=self.storage)
                self._states[name] = {t.number: t.state for t in study.get_trials(deepcopy=False)}
            except KeyError:
                self._states[name] = {}
        return self._states[name].get(int(number)) == TrialState.RUNNING


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunnerConfig:
    """What a worker needs (picklable: passed to worker processes)."""

    results: str
    data_dir: str
    device: str
    tracking_uri: str
    storage: str
    study: str
    experiment_id: str
    parent_run_id: str
    code_version: str
    heartbeat: int = DEFAULT_HEARTBEAT
    devices: tuple[str, ...] = ()
    threads: int | None = None
    grid: str = ""
    teachers: tuple[tuple[str, str, str], ...] = ()  # (dataset, arch, sha256) the grid is fixed to
    requeue_interrupted: bool = False  # submitit jobs: a cell cut by a signal goes back into the queue
    deadline: float | None = None  # --stop-after: time.time() at which running cells checkpoint and stop

    def settings(self, index: int) -> Settings:
        device = self.devices[index % len(self.devices)] if self.devices else self.device
        return Settings(Path(self.results), Path(self.data_dir), device)

    def checkpoint_path(self, cell_id: str) -> Path:
        """Where a cell of this grid checkpoints: ``<results>/checkpoints/<grid>/<cell_id>.pt``."""
        return checkpoint_path(Path(self.results), self.grid, cell_id)


def checkpoint_path(results: Path, grid: str, cell_id: str) -> Path:
    return Path(results) / "checkpoints" / grid / f"{cell_id}.pt"


# ----------------------------------------------------------------------------- one cell
class TrialProgress(BaseCallback):
    """Reports a running cell's iteration and validation accuracy into its trial (for the display)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.last = 0.0
        self.val: float | None = None

    def on_progress(self, iteration: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY or iteration == total:
            self.last = now
            self.trial.set_user_attr("progress", [iteration, total, self.val])

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "val_accuracy" in metrics:
            self.val = metrics["val_accuracy"]


def _best_effort(action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except Exception:  # noqa: BLE001  (recording an outcome must not hide the outcome)
        pass


@dataclass
class Worker:
    """Pops cells from the queue and runs them until no cell is waiting or running anywhere."""

    config: RunnerConfig
    index: int = 0
    poll: float = 1.0
    _data: dict[tuple[Any, ...], TaskData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.settings = self.config.settings(self.index)
        self.storage = open_storage(self.config.storage, self.config.heartbeat)
        self.study = optuna.load_study(study_name=self.config.study, storage=self.storage)
        self.client = tracking.open_client(self.config.tracking_uri)
        self.tag = f"{socket.gethostname()}:{os.getpid()}"
        for dataset, arch, sha in self.config.teachers:  # a worker on a machine without the teacher pulls it
            if not (teacher_dir(self.settings.results, dataset, arch) / "manifest.json").is_file():
                teacher_store.pull(self.client, self.settings.results, dataset, arch, sha)

    def run(self) -> None:
        ran = False
        while True:
            # A slice ends before the next cell only once this worker ran one: each invocation makes progress
            # (a cell stops after at least one iteration), even with a slice shorter than the setup.
            if ran and self.config.deadline is not None and time.time() >= self.config.deadline:
                raise SliceEnded("time slice ended before the next cell")
            states = [t.state for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,
                                                                                      TrialState.RUNNING))]
            if TrialState.WAITING in states:
                ran = True
                self.study.optimize(self.objective, n_trials=1, catch=(CellFailed,), gc_after_trial=False)
            elif TrialState.RUNNING in states:
                # Cells run elsewhere: wait, so that one whose worker dies is retried here.
                fail_stale(self.study)
                time.sleep(self.poll)
            else:
                return

    def objective(self, trial: optuna.Trial) -> float:
        """Run the trial's cell; any error becomes :class:`CellFailed` so that the grid goes on."""
        try:
            return self._objective(trial)
        except (CellFailed, optuna.TrialPruned, KeyboardInterrupt, SliceEnded):
            raise
        except Exception as error:  # the store or the queue failed around the cell
            _best_effort(trial.set_user_attr, "error", f"{type(error).__name__}: {error}"[:2000])
            raise CellFailed(str(error)) from error

    def _objective(self, trial: optuna.Trial) -> float:
        data = trial.user_attrs.get("cell")
        if data is None:  # the queue emptied between our look and our pop: not a cell
            raise optuna.TrialPruned("no cell was waiting")
        cell = Cell.from_dict(data)
        if cell.cell_id != data["cell_id"]:
            raise CellFailed(f"cell {data['cell_id']} resolves to {cell.cell_id} with this code version")
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if other.number < trial.number and other.user_attrs.get("cell_id") == cell.cell_id:
                trial.set_user_attr("duplicate_of", other.number)
                raise optuna.TrialPruned(f"cell already running as trial {other.number}")
        exp = self.config.experiment_id
        if tracking.search(self.client, exp, f"tags.`{tracking.CELL_ID}` = '{cell.cell_id}' "
                                              "and attributes.status = 'FINISHED'"):
            trial.set_user_attr("duplicate_of", "finished")
            raise optuna.TrialPruned("cell already finished")
        tracking.kill_stale(self.client, exp, Liveness(self.storage), cell_id=cell.cell_id)
        return self.run_cell(cell, trial)

    def check_teacher(self, cell: Cell, manifest: dict[str, Any]) -> None:
        """Refuse a cell whose cached teacher is not the one the grid is fixed to (no mixing of teachers)."""
        for dataset, arch, sha in self.config.teachers:
            if (dataset, arch) == (cell.spec.dataset, cell.spec.teacher) and manifest["sha256"] != sha:
                raise teacher_store.mismatch(dataset, arch, manifest["sha256"], self.config.grid, sha, "fixed by the grid's first invocation", self.settings.results)

    def task_data(self, cell: Cell, manifest: dict[str, Any]) -> TaskData:
        key = (cell.spec.dataset, tuple(manifest["mean"]), tuple(manifest["std"]), self.settings.device)
        if key not in self._data:
            self._data.clear()  # keep one dataset in memory
            self._data[key] = load_data(cell.spec, self.settings, manifest)
        return self._data[key]

    def run_cell(self, cell: Cell, trial: optuna.Trial) -> float:
        from .experiment import execute

        cfg = self.config
        trial.set_user_attr("worker", self.tag)
        path = cfg.checkpoint_path(cell.cell_id)
        queue_tags = {tracking.QUEUE_STUDY: cfg.study, tracking.QUEUE_TRIAL: str(trial.number), "dfkd.worker": self.tag}
        try:
            manifest = read_manifest(self.settings.results, cell.spec.dataset, cell.spec.teacher)
            self.check_teacher(cell, manifest)
            previous = tracking.resumable_run(self.client, cfg.experiment_id, cell.cell_id) if path.exists() else None
            if previous is not None:  # the cell resumes from its checkpoint: its run continues
                run_id = tracking.reopen_cell_run(self.client, previous, queue_tags)
            else:
                run_id = tracking.start_cell_run(self.client, cfg.experiment_id, cfg.parent_run_id, cell, manifest,
                                                 cfg.code_version, queue_tags)
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise CellFailed(str(error)) from error
        trial.set_user_attr("run_id", run_id)
        callbacks = [tracking.MlflowCallback(self.client, run_id), TrialProgress(trial)]
        try:
            checkpoint = CheckpointConfig(path, resume=True, deadline=cfg.deadline)
            result, _ = execute(cell.spec, self.settings, callbacks, data=self.task_data(cell, manifest),
                                checkpoint=checkpoint)
            tracking.log_result(self.client, run_id, result)
        except SliceEnded as stop:  # checkpoint written: the next invocation continues this run
            _best_effort(self.client.set_tag, run_id, "dfkd.ended", f"time slice ended (--stop-after): {stop}")
            _best_effort(tracking.end_run, self.client, run_id, "KILLED")
            raise
        except (KeyboardInterrupt, SystemExit) as error:
            _best_effort(self.client.set_tag, run_id, "dfkd.ended", f"interrupted ({type(error).__name__})")
            _best_effort(tracking.end_run, self.client, run_id, "KILLED")
            if cfg.requeue_interrupted:  # a preempted / requeued job: the cell runs again, here or elsewhere
                _best_effort(lambda: self.study.enqueue_trial(
                    {}, user_attrs={k: trial.user_attrs[k] for k in ("cell_id", "label", "cell")}))
            raise
        except Exception as error:
            _best_effort(tracking.log_error, self.client, run_id, error)
            _best_effort(tracking.end_run, self.client, run_id, "FAILED")
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise CellFailed(str(error)) from error
        tracking.end_run(self.client, run_id, "FINISHED")
        trial.set_user_attr("result", {
            "test_accuracy": result.test_accuracy,
            "best_val_test_accuracy": result.best_val_test_accuracy,
            "best_val_accuracy": result.best_val_accuracy,
            "wall_seconds": result.wall_seconds,
        })
        return result.best_val_accuracy


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def worker_process(config: RunnerConfig, index: int) -> None:
    """Entry point of a worker process (``--workers N``)."""
    tune_malloc()  # a spawned process starts with glibc's defaults (see benchmark.cpu_tuning)
    signal.signal(signal.SIGTERM, _on_sigterm)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        Worker(config, index).run()
    except KeyboardInterrupt:
        sys.exit(130)
    except SliceEnded:
        sys.exit(EXIT_SLICE_ENDED)


# ----------------------------------------------------------------------------- preparing a grid
def missing_teachers(plan: Plan, results: Path) -> list[tuple[str, str]]:
    return [(d, a) for d, a in plan.teachers if not (teacher_dir(results, d, a) / "manifest.json").is_file()]


def ensure_teachers(plan: Plan, settings: Settings, train: bool, echo: Echo) -> None:
    """Train (spec §1.7 recipe) every teacher the cells need that the cache lacks."""
    missing = missing_teachers(plan, settings.results)
    if missing and not train:
        names = ", ".join(f"{d}/{a}" for d, a in missing)
        raise DfkdError(f"no cached teacher for {names}; run without --no-train-teachers, or: "
                        f"dfkd-bench teachers train --dataset {missing[0][0]} --arch {missing[0][1]}")
    for dataset, arch in missing:
        recipe = default_recipe(dataset)
        echo(f"training teacher {dataset}/{arch} ({recipe.optimizer} lr {recipe.lr:g}, {recipe.epochs} epochs) "
             f"-> {teacher_dir(settings.results, dataset, arch)}")
        data = load_task(dataset, settings.data_dir, device=settings.torch_device)

        def report(epoch: int, metrics: dict[str, float], recipe: Any = recipe) -> None:
            echo(f"  epoch {epoch}/{recipe.epochs}: loss {metrics['loss']:.4f}  val {100 * metrics['val_accuracy']:.2f}%")

        manifest = timed_train(settings.results, dataset, arch, data, recipe, 0, settings.torch_device, report)
        echo(f"  teacher {dataset}/{arch}: test {100 * manifest['test_accuracy']:.2f}% in {manifest['train_seconds']:.0f} s")


@dataclass
class Prepared:
    """A grid made ready to run: store, experiment, parent run and queue."""

    config: RunnerConfig
    done_before: set[str]
    enqueued: int
    killed: list[str]


def prepare(plan: Plan, settings: Settings, tracking_uri: str, storage_url: str, heartbeat: int,
            workers: int, devices: Sequence[str], threads: int | None = None,
            teachers: dict[tuple[str, str], str] | None = None, requeue_interrupted: bool = False,
            deadline: float | None = None) -> Prepared:
    """Create the store and experiment once, fix the grid's teachers, mark stale runs KILLED, open the
    parent run, enqueue cells."""
    client = tracking.open_client(tracking_uri)
    experiment_id = tracking.ensure_experiment(client, plan.grid.name, settings.results, tracking_uri)
    teachers = teachers or {}
    teacher_store.fix(client, experiment_id, plan.grid.name, teachers, settings.results)
    storage = open_storage(storage_url, heartbeat)
    name = study_name(plan)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    for (dataset, arch), sha in teachers.items():
        if study.user_attrs.get(f"teacher:{dataset}/{arch}") != sha:
            study.set_user_attr(f"teacher:{dataset}/{arch}", sha)
    fail_stale(study)
    killed = [r.info.run_id for r in tracking.kill_stale(client, experiment_id, Liveness(storage), kind="cell")]
    killed += [r.info.run_id for r in tracking.kill_stale_grid_runs(client, experiment_id)]
    version = tracking.code_version()
    parent = tracking.start_grid_run(
        client, experiment_id, plan,
        tags={"grid": plan.grid.name, "dfkd.queue.study": name, "dfkd.host": socket.gethostname()},
        params={"grid": plan.grid.name, "grid_source": plan.grid.source, "cells": len(plan.cells),
                "skipped": len(plan.skipped), "workers": workers, "devices": ",".join(devices) or settings.device,
                "code_version": version, "queue_storage": redact(storage_url),
                **{f"teacher.{d}/{a}": sha for (d, a), sha in teachers.items()}},
        heartbeat=heartbeat,
    )
    done = set(tracking.finished_cells(client, experiment_id)) & {c.cell_id for c in plan.cells}
    active = {t.user_attrs.get("cell_id") for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,
                                                                                            TrialState.RUNNING))}
    enqueued = 0
    for cell in plan.queue_order():  # longest expected first: workers pop WAITING trials in enqueue order
        if cell.cell_id in done or cell.cell_id in active:
            continue
        study.enqueue_trial({}, user_attrs={"cell_id": cell.cell_id, "label": cell.label, "cell": cell.to_dict()})
        enqueued += 1
    cpu_threads = threads
    if cpu_threads is None and workers > 1 and not any(d.startswith("cuda") for d in devices):
        cpu_threads = max(1, (os.cpu_count() or 1) // workers)  # share the cores instead of oversubscribing
    config = RunnerConfig(
        results=str(settings.results), data_dir=str(settings.data_dir), device=settings.device,
        tracking_uri=tracking_uri, storage=storage_url, study=name, experiment_id=experiment_id,
        parent_run_id=parent, code_version=version, heartbeat=heartbeat, devices=tuple(devices), threads=cpu_threads,
        grid=plan.grid.name, teachers=tuple((d, a, sha) for (d, a), sha in sorted(teachers.items())),
        requeue_interrupted=requeue_interrupted, deadline=deadline,
    )
    return Prepared(config, done, enqueued, killed)


# ----------------------------------------------------------------------------- progress display
@dataclass
class CellView:
    cell: Cell
    state: str  # done | failed | running | queued | pending
    progress: tuple[int, int, float | None] | None = None
    started: float | None = None
    seconds: float | None = None
    result: dict[str, float] | None = None
    error: str | None = None
    new: bool = False  # finished during this invocation


class Monitor:
    """Polls the queue: cells done / total, running cells with their progress, ETA; keeps the parent alive."""

    def __init__(self, plan: Plan, prepared: Prepared, workers: int, echo: Echo, live: bool) -> None:
        self.plan = plan
        self.prepared = prepared
        self.workers = workers
        self.echo = echo
        self.live_display = live
        self.storage = open_storage(prepared.config.storage, prepared.config.heartbeat)
        self.study = optuna.load_study(study_name=prepared.config.study, storage=self.storage)
        self.client = tracking.open_client(prepared.config.tracking_uri)
        self.started = time.time()
        self.reported: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._beat = 0.0

    # -- state
    def snapshot(self) -> list[CellView]:
        latest: dict[str, Any] = {}
        for trial in self.study.get_trials(deepcopy=False):
            cid = trial.user_attrs.get("cell_id")
            if cid is None or trial.state == TrialState.PRUNED:
                continue
            if cid not in latest or trial.number > latest[cid].number:
                latest[cid] = trial
        views = []
        for cell in self.plan.cells:
            trial = latest.get(cell.cell_id)
            view = CellView(cell, "pending")
            if cell.cell_id in self.prepared.done_before:
                view.state = "done"
            if trial is not None and (trial.state in (TrialState.RUNNING, TrialState.WAITING)
                                      or (trial.datetime_complete is not None
                                          and trial.datetime_complete.timestamp() >= self.started)):
                start = trial.datetime_start.timestamp() if trial.datetime_start else None
                end = trial.datetime_complete.timestamp() if trial.datetime_complete else None
                view.started = start
                view.seconds = (end - start) if (start and end) else None
                if trial.state == TrialState.COMPLETE:
                    view.state, view.new, view.result = "done", True, trial.user_attrs.get("result")
                elif trial.state == TrialState.FAIL:
                    view.state, view.new, view.error = "failed", True, trial.user_attrs.get("error", "interrupted")
                elif trial.state == TrialState.RUNNING:
                    view.state = "running"
                    progress = trial.user_attrs.get("progress")
                    view.progress = tuple(progress) if progress else None  # type: ignore[assignment]
                elif trial.state == TrialState.WAITING:
                    view.state = "queued"
            views.append(view)
        return views

    def eta(self, views: list[CellView]) -> float | None:
        durations = [v.seconds for v in views if v.new and v.state == "done" and v.seconds]
        left = [v for v in views if v.state in ("queued", "running", "pending")]
        if not left:
            return 0.0
        now = time.time()
        if durations:
            mean = sum(durations) / len(durations)
        else:  # from the running cells' progress
            rates = [(now - v.started) / (v.progress[0] / v.progress[1]) for v in views
                     if v.state == "running" and v.started and v.progress and v.progress[0] >= 0.05 * v.progress[1]]
            if not rates:
                return None
            mean = sum(rates) / len(rates)
        work = sum(max(0.0, mean - (now - v.started)) if v.state == "running" and v.started else mean for v in left)
        return work / max(1, min(self.workers, len(left)))

    # -- output
    def _report_events(self, views: list[CellView]) -> None:
        total = len(views)
        done = sum(v.state == "done" for v in views)
        for view in views:
            key = (view.cell.cell_id, view.state)
            if key in self.reported or not (view.new or view.state == "running"):
                continue
            self.reported.add(key)
            if view.state == "running":
                self._print(f"[{done}/{total}] start  {view.cell.label}")
            elif view.state == "done":
                r = view.result or {}
                self._print(f"[{done}/{total}] done   {view.cell.label}: test {100 * r.get('test_accuracy', math.nan):.2f}% "
                            f"(best-val {100 * r.get('best_val_test_accuracy', math.nan):.2f}%) "
                            f"in {r.get('wall_seconds', math.nan):.1f} s")
            elif view.state == "failed":
                self._print(f"[{done}/{total}] FAILED {view.cell.label}: {view.error}")

    def _print(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            self.echo(line)

    def render(self, views: list[CellView]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        total = len(views)
        done = sum(v.state == "done" for v in views)
        failed = sum(v.state == "failed" for v in views)
        running = [v for v in views if v.state == "running"]
        eta = self.eta(views)
        head = Text(f"grid {self.plan.grid.name}: {done}/{total} done, {failed} failed, {len(running)} running, "
                    f"elapsed {_duration(time.time() - self.started)}, ETA {_duration(eta) if eta is not None else '?'}")
        bar = ProgressBar(total=max(total, 1), completed=done + failed, width=40)
        table = Table.grid(padding=(0, 1))
        for view in running:
            it, n, val = view.progress or (0, 1, None)
            table.add_row(Text(view.cell.label, no_wrap=True, overflow="ellipsis"),
                          ProgressBar(total=max(n, 1), completed=it, width=16),
                          Text(f"{it}/{n}", no_wrap=True), Text(f"val {100 * val:.1f}%" if val is not None else ""),
                          Text(_duration(time.time() - view.started) if view.started else ""))
        return Group(head, bar, table)

    def tick(self) -> list[CellView]:
        views = self.snapshot()
        self._report_events(views)
        if self._live is not None:
            self._live.update(self.render(views))
        now = time.time()
        if now - self._beat >= self.prepared.config.heartbeat:
            self._beat = now
            _best_effort(self.client.set_tag, self.prepared.config.parent_run_id, tracking.HEARTBEAT, str(now))
            _best_effort(tracking.kill_stale_grid_runs, self.client, self.prepared.config.experiment_id)
        return views

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            _best_effort(self.tick)

    def __enter__(self) -> Monitor:
        if self.live_display:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._loop, name="dfkd-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _best_effort(self.tick)
        _best_effort(tracking.kill_stale_grid_runs, self.client, self.prepared.config.experiment_id)
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------- running a grid
@dataclass
class CellRow:
    """A cell's outcome as read back from MLflow (and the queue, for cells that never got a run)."""

    cell: Cell
    status: str
    metrics: dict[str, float]
    run_id: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        s = self.cell.spec
        return {"cell_id": self.cell.cell_id, "method": s.method, "dataset": s.dataset, "pair": self.cell.pair,
                "collected": s.budget.collected, "seed": s.seed, "profile": s.profile, "status": self.status,
                "run_id": self.run_id, "error": self.error, **self.metrics}


@dataclass
class Outcome:
    plan: Plan
    rows: list[CellRow]
    wall_seconds: float
    interrupted: bool = False
    stopped: bool = False  # --stop-after ended the time slice: run the same command again
    experiment_id: str = ""
    parent_run_id: str = ""
    tracking_uri: str = ""
    submitted: str | None = None  # --launcher slurm: the job array's id (the cells run later)

    @property
    def failed(self) -> list[CellRow]:
        return [r for r in self.rows if r.status != "FINISHED"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.stopped:
            return EXIT_SLICE_ENDED
        return 1 if self.failed else 0


FINAL_METRICS = ("test_accuracy", "best_val_test_accuracy", "best_val_accuracy", "teacher_accuracy",
                 "wall_seconds") + ACCOUNTING_KEYS


def collect(client: MlflowClient, experiment_id: str, plan: Plan, errors: dict[str, str] | None = None) -> list[CellRow]:
    """Each cell's FINISHED run, else its latest run, else 'NOT RUN' (with the queue's error if any)."""
    latest = tracking.latest_by_cell(client, experiment_id)
    rows = []
    for cell in plan.cells:
        run = latest.get(cell.cell_id)
        if run is None:
            rows.append(CellRow(cell, "NOT RUN", {}, None, (errors or {}).get(cell.cell_id)))
            continue
        metrics = {k: run.data.metrics[k] for k in FINAL_METRICS if k in run.data.metrics}
        rows.append(CellRow(cell, run.info.status, metrics, run.info.run_id, run.data.tags.get("dfkd.error")))
    return rows


def run_grid(
    plan: Plan,
    settings: Settings,
    *,
    workers: int = 1,
    devices: Sequence[str] = (),
    tracking_uri: str | None = None,
    storage: str | None = None,
    heartbeat: int = DEFAULT_HEARTBEAT,
    threads: int | None = None,
    train_teachers: bool = True,
    echo: Echo = print,
    live: bool = False,
    launcher: str = "processes",
    slurm: Any = None,
    stop_after: float | None = None,
) -> Outcome:
    """Run every cell of ``plan`` not yet finished, in ``workers`` processes; returns the outcome.

    With one worker the cells run in this process.  ``threads``: torch intra-op threads per worker
    (default: torch's own choice with one worker, the cores split evenly with several).
    Ctrl-C or SIGTERM marks the running cells
    KILLED and returns an interrupted outcome (exit code 130); running the same grid again resumes.

    Both stores are checked first (:func:`~benchmark.stores.check_stores`), then the grid's
    teachers resolved (:func:`~benchmark.teacher_store.resolve`: the one the grid is fixed to,
    pulled when missing here), so that a bad URL or a mismatching teacher writes nothing.
    ``launcher``: ``processes`` (worker processes here), ``local`` or ``slurm``
    (:mod:`benchmark.launchers`; ``slurm`` returns once the job array is submitted).
    ``stop_after``: seconds; then the running cells checkpoint at their next iteration, no new cell
    starts, and the outcome is ``stopped`` (exit code 75); the same command continues the grid.
    """
    started = time.time()
    if stop_after is not None and launcher == "slurm":
        raise DfkdError("--stop-after does not apply to --launcher slurm (jobs start later); "
                        "use --slurm-time: a requeued job resumes its cell from the checkpoint")
    deadline = None if stop_after is None else started + stop_after
    uri = tracking.resolve_tracking_uri(settings.results, tracking_uri)
    storage_url = storage or default_storage(settings.results)
    if devices:
        settings = dataclasses.replace(settings, device=devices[0])
    if launcher != "processes":
        from .launchers import check_launcher

        check_launcher(launcher, slurm)
    check_stores(uri, storage_url)
    resolved = teacher_store.resolve(plan.teachers, settings.results, tracking.open_client(uri), plan.grid.name, echo)
    ensure_teachers(plan, settings, train_teachers, echo)
    shas = {key: sha or read_manifest(settings.results, *key)["sha256"] for key, sha in resolved.items()}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prepared = prepare(plan, settings, uri, storage_url, heartbeat, workers, devices, threads, shas,
                       requeue_interrupted=launcher != "processes", deadline=deadline)
    cfg = prepared.config
    for run_id in prepared.killed:
        echo(f"marked stale run {run_id} KILLED (its process had stopped)")
    echo(f"grid {plan.grid.name}: {len(plan.cells)} cells ({len(prepared.done_before)} already finished, "
         f"{prepared.enqueued} queued now), {len(plan.skipped)} skipped; {workers} worker(s); tracking {uri}")
    if launcher == "slurm":
        return _submit_slurm(plan, settings, prepared, workers, slurm, started, echo)
    interrupted = stopped = False
    previous = _install_sigterm()
    try:
        with Monitor(plan, prepared, workers, echo, live) as monitor:
            try:
                if launcher == "local":
                    _run_local(plan, settings, cfg, workers, slurm, echo)
                elif workers <= 1:
                    previous_threads = torch.get_num_threads()
                    if cfg.threads:
                        torch.set_num_threads(cfg.threads)
                    try:
                        Worker(cfg, 0).run()
                    finally:
                        torch.set_num_threads(previous_threads)
                else:
                    _run_processes(cfg, workers)
            except KeyboardInterrupt:
                interrupted = True
            except SliceEnded:
                stopped = True
            views = monitor.snapshot()
    finally:
        _restore_sigterm(previous)
    client = tracking.open_client(uri)
    errors = {v.cell.cell_id: v.error for v in views if v.error}
    rows = collect(client, cfg.experiment_id, plan, errors)
    wall = time.time() - started
    failed = sum(r.status != "FINISHED" for r in rows)
    status = "KILLED" if interrupted or stopped else ("FAILED" if failed else "FINISHED")
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _best_effort(lambda: client.log_batch(cfg.parent_run_id, metrics=[
        Metric("cells_finished", float(len(rows) - failed), now, 0), Metric("cells_not_finished", float(failed), now, 0),
        Metric("cells_skipped", float(len(plan.skipped)), now, 0), Metric("wall_seconds", wall, now, 0)]))
    _best_effort(lambda: tracking.end_run(client, cfg.parent_run_id, status))
    return Outcome(plan, rows, wall, interrupted, stopped, cfg.experiment_id, cfg.parent_run_id, uri)


def _submitit_folder(settings: Settings, plan: Plan) -> Path:
    return (Path(settings.results) / "submitit" / plan.grid.name).resolve()


def _run_local(plan: Plan, settings: Settings, cfg: RunnerConfig, workers: int, slurm: Any, echo: Echo) -> None:
    """``--launcher local``: the workers as submitit LocalExecutor jobs; wait for them."""
    from .launchers import make_executor, submit_workers, wait_jobs

    executor = make_executor("local", _submitit_folder(settings, plan), workers, plan.grid.name, slurm)
    jobs = submit_workers(executor, cfg, workers)
    echo(f"started {len(jobs)} submitit local job(s): {', '.join(str(j.job_id) for j in jobs)}")
    for line in wait_jobs(jobs):
        echo(line)


def _submit_slurm(plan: Plan, settings: Settings, prepared: Prepared, workers: int, slurm: Any, started: float,
                  echo: Echo) -> Outcome:
    """``--launcher slurm``: submit the workers as one job array; the parent run ends with the submission."""
    from .launchers import array_id, make_executor, submit_workers

    cfg = prepared.config
    client = tracking.open_client(cfg.tracking_uri)
    try:
        executor = make_executor("slurm", _submitit_folder(settings, plan), workers, plan.grid.name, slurm)
        jobs = submit_workers(executor, cfg, workers)
    except Exception as error:
        _best_effort(tracking.end_run, client, cfg.parent_run_id, "FAILED")
        raise DfkdError(f"sbatch failed: {str(error).strip().splitlines()[0][:300] if str(error).strip() else error!r}") from None
    job = array_id(jobs)
    _best_effort(client.set_tag, cfg.parent_run_id, "dfkd.slurm_job", job)
    _best_effort(client.set_tag, cfg.parent_run_id, "dfkd.ended", f"submitted Slurm job array {job} ({workers} workers)")
    _best_effort(tracking.end_run, client, cfg.parent_run_id, "FINISHED")
    rows = collect(client, cfg.experiment_id, plan)
    return Outcome(plan, rows, time.time() - started, False, False, cfg.experiment_id, cfg.parent_run_id,
                   cfg.tracking_uri, submitted=job)


def _install_sigterm() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def _run_processes(cfg: RunnerConfig, workers: int) -> None:
    """Start ``workers`` worker processes and wait; on interrupt, stop them (they mark their runs KILLED)."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker_process, args=(cfg, i), name=f"dfkd-worker-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        while any(p.is_alive() for p in procs):
            for proc in procs:
                proc.join(timeout=0.5)
    except KeyboardInterrupt as error:
        # Ctrl-C reached the workers too (same process group): let them mark their runs KILLED.
        # SIGTERM reached only us: forward it at once.
        grace = 0.0 if isinstance(error, Interrupted) else 15.0
        _stop_processes(procs, grace)
        raise
    if any(proc.exitcode == EXIT_SLICE_ENDED for proc in procs):
        raise SliceEnded("time slice ended")


def _stop_processes(procs: list[Any], grace: float) -> None:
    deadline = time.time() + grace
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.time()))
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            _best_effort(lambda pid=proc.pid: os.kill(pid, signal.SIGTERM))
    deadline = time.time() + 60
    for proc in procs:
        proc.join(timeout=max(0.1, deadline - time.time()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
