"""Hyperparameter search with Optuna: TPE over a method's declared search space, median pruning.

Spec §1.5: the objective is the best validation accuracy; the test split is never computed
during a search (``distill(..., evaluate_test=False)``).  Every trial is an MLflow run nested
under the study's run (tag ``dfkd.kind=trial``, the cell schema of :mod:`benchmark.tracking`
otherwise: params ``hp.<name>``, tags ``method`` / ``dataset`` / ``budget`` / ``pair`` ...,
``val_accuracy`` at each evaluation with step = iteration, final ``best_val_accuracy``) with its
state as tag ``dfkd.trial_state`` (complete / pruned / failed) and as the run status (FINISHED /
KILLED / FAILED).  A study lives in an Optuna RDB storage (SQLite ``<results>/tune.db`` by
default) and resumes there: ``--trials`` is the total the study should reach, so re-running the
same command after an interruption only runs the missing trials.  ``--workers N`` runs N
processes on the same study.

``optuna_integration.MLflowCallback`` is not used (nor a dependency): it logs each trial after the
fact as a separate run holding only the suggested values and the objective, through MLflow's
process-global fluent API.  The tuner already records every trial as a full cell run as it
trains (metric history the pruner reads, every resolved hyperparameter, teacher id, artifacts),
so the callback would only add a second, thinner copy of each trial.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from methods.core.api import Budget, TaskData
from methods.core.context import BaseCallback
from methods.core.errors import DfkdError
from methods.core.registry import get_method

from . import tracking
from .cpu_tuning import tune_malloc
from .experiment import RunSpec, check, load_data
from .grid import make_cell
from .settings import Settings
from .teachers import load_teacher, read_manifest
from .workqueue import DEFAULT_HEARTBEAT, fail_stale, open_storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

TUNE_DB = "tune.db"
STUDY_KIND = "study"
TRIAL_KIND = "trial"
STUDY_TAG = "dfkd.study"
STATE_TAG = "dfkd.trial_state"
TRIAL_TAG = "dfkd.trial_number"
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
Echo = Callable[[str], None]


def default_tune_storage(results: Path) -> str:
    return f"sqlite:///{(Path(results) / TUNE_DB).resolve()}"


def search_space(method: str, params: Sequence[str] | None = None) -> dict[str, BaseDistribution]:
    """The method's declared search space, or the subset ``params`` of it (unknown names: one-line error)."""
    space = dict(get_method(method).search_space)
    if not space:
        raise DfkdError(f"method {method!r} declares no search space; nothing to tune")
    if params:
        unknown = [p for p in params if p not in space]
        if unknown:
            raise DfkdError(f"unknown search parameter {unknown[0]!r} for method {method!r}; "
                            f"allowed: {', '.join(space)}")
        space = {p: space[p] for p in params}
    return space


def suggest(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Sample every parameter of ``space`` through the trial's public suggest API."""
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        else:
            raise DfkdError(f"search parameter {name!r}: unsupported distribution {type(dist).__name__}")
    return values


def default_study_name(method: str, dataset: str, teacher: str, student: str, collected: int, profile: str,
                       iterations: int | None) -> str:
    name = f"tune-{method}-{dataset}-{teacher}-{student}-c{collected}-{profile}"
    return name + (f"-i{iterations}" if iterations else "")


@dataclass(frozen=True)
class TuneConfig:
    """What a tuning process needs (picklable: passed to worker processes)."""

    method: str
    dataset: str
    teacher: str
    student: str
    collected: int
    profile: str
    iterations: int | None
    seed: int
    params: tuple[str, ...]
    trials: int
    study: str
    storage: str
    tracking_uri: str
    results: str
    data_dir: str
    device: str
    experiment_id: str = ""
    parent_run_id: str = ""
    code_version: str = ""
    pruner_startup: int = 3
    pruner_warmup: int = 0
    heartbeat: int = DEFAULT_HEARTBEAT
    threads: int | None = None

    @property
    def settings(self) -> Settings:
        return Settings(Path(self.results), Path(self.data_dir), self.device)

    def spec(self, overrides: Mapping[str, Any]) -> RunSpec:
        return RunSpec(self.method, self.dataset, self.teacher, self.student,
                       Budget(self.collected, iterations=self.iterations), self.profile, self.seed,
                       tuple(overrides.items()))


class PruningCallback(BaseCallback):
    """Reports each validation accuracy to the trial and stops a weak trial (``optuna.TrialPruned``)."""

    def __init__(self, trial: optuna.Trial, total: int) -> None:
        self.trial = trial
        self.total = total

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "val_accuracy" not in metrics:
            return
        value = float(metrics["val_accuracy"])
        self.trial.report(value, int(step))
        if step < self.total and self.trial.should_prune():
            raise optuna.TrialPruned(f"val_accuracy {value:.4f} at iteration {step} is below the median")


def make_study(config: TuneConfig) -> optuna.Study:
    storage = open_storage(config.storage, config.heartbeat) if config.storage.startswith(
        ("sqlite", "postgresql", "mysql")) else config.storage
    return optuna.create_study(
        study_name=config.study, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=None),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=config.pruner_startup,
                                           n_warmup_steps=config.pruner_warmup),
    )


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


class Tuner:
    """One process of a search: runs trials until the study holds ``config.trials`` finished ones."""

    def __init__(self, config: TuneConfig, echo: Echo | None = None) -> None:
        self.config = config
        self.echo = echo or (lambda line: None)
        self.study = make_study(config)
        self.client = tracking.open_client(config.tracking_uri)
        self.space = search_space(config.method, config.params)
        self.manifest = read_manifest(Path(config.results), config.dataset, config.teacher)
        self._data: TaskData | None = None
        self.tag = f"{socket.gethostname()}:{os.getpid()}"

    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_data(self.config.spec({}), self.config.settings, self.manifest)
        return self._data

    def run(self, limit: int | None = None) -> None:
        """Run trials until the study holds ``trials`` finished ones (at most ``limit`` here)."""
        cfg = self.config

        def enough(study: optuna.Study, trial: FrozenTrial) -> None:
            if finished_count(study) >= cfg.trials:
                study.stop()

        fail_stale_trials(self.study)
        left = cfg.trials - finished_count(self.study)
        if limit is not None:
            left = min(left, limit)
        if left > 0:
            self.study.optimize(self.objective, n_trials=left, callbacks=[enough], catch=(Exception,),
                                gc_after_trial=False)

    def objective(self, trial: optuna.Trial) -> float:
        from .experiment import execute

        cfg = self.config
        values = suggest(trial, self.space)
        spec = cfg.spec(values)
        cell = make_cell(spec)
        run_id = tracking.start_cell_run(
            self.client, cfg.experiment_id, cfg.parent_run_id, cell, self.manifest, cfg.code_version,
            {tracking.KIND: TRIAL_KIND, STUDY_TAG: cfg.study, TRIAL_TAG: str(trial.number), "dfkd.worker": self.tag},
        )
        trial.set_user_attr("run_id", run_id)
        total = cell.hparams["iterations"]
        callbacks = [tracking.MlflowCallback(self.client, run_id), PruningCallback(trial, total)]
        started = time.perf_counter()
        try:
            result, _ = execute(spec, cfg.settings, callbacks, data=self.data(), evaluate_test=False)
        except optuna.TrialPruned:
            self.client.set_tag(run_id, STATE_TAG, "pruned")
            tracking.end_run(self.client, run_id, "KILLED")
            self.echo(f"trial {trial.number}: pruned after {time.perf_counter() - started:.0f} s  {_fmt(values)}")
            raise
        except KeyboardInterrupt:
            self.client.set_tag(run_id, STATE_TAG, "interrupted")
            tracking.end_run(self.client, run_id, "KILLED")
            raise
        except Exception as error:
            tracking.log_error(self.client, run_id, error)
            self.client.set_tag(run_id, STATE_TAG, "failed")
            tracking.end_run(self.client, run_id, "FAILED")
            self.echo(f"trial {trial.number}: failed ({type(error).__name__}: {error})  {_fmt(values)}")
            raise
        self.client.set_tag(run_id, STATE_TAG, "complete")
        self.client.set_tag(run_id, "best_iteration", str(result.best_iteration))
        tracking.end_run(self.client, run_id, "FINISHED")
        value = result.best_val_accuracy
        self.echo(f"trial {trial.number}: best val {100 * value:.2f}% in {result.wall_seconds:.0f} s  {_fmt(values)}")
        return value


def fail_stale_trials(study: optuna.Study) -> None:
    """Trials left RUNNING by a dead process are failed (and, on an RDB storage, retried)."""
    try:
        fail_stale(study)
    except (ValueError, RuntimeError):  # a storage without heartbeats
        pass


def _fmt(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def tune_process(config: TuneConfig, limit: int) -> None:
    """Entry point of a ``--workers N`` process (``limit``: its share of the missing trials)."""
    tune_malloc()  # a spawned process starts with glibc's defaults (see benchmark.cpu_tuning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        Tuner(config).run(limit)
    except KeyboardInterrupt:
        sys.exit(130)


def study_run(client: MlflowClient, experiment_id: str, config: TuneConfig) -> str:
    """The study's MLflow run: found again on resume (set RUNNING), created otherwise."""
    from mlflow.entities import Param

    found = tracking.search(client, experiment_id,
                            f"tags.`{tracking.KIND}` = '{STUDY_KIND}' and tags.`{STUDY_TAG}` = '{config.study}'")
    if found:
        run_id = sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=config.study, tags={
        tracking.KIND: STUDY_KIND, STUDY_TAG: config.study, "method": config.method, "dataset": config.dataset,
        "budget": str(config.collected), "pair": f"{config.teacher}->{config.student}", "profile": config.profile,
        "seed": str(config.seed),
    })
    params = {"method": config.method, "dataset": config.dataset, "teacher": config.teacher,
              "student": config.student, "budget.collected": config.collected, "profile": config.profile,
              "iterations": config.iterations or "profile", "seed": config.seed, "sampler": "TPE",
              "pruner": f"median(startup={config.pruner_startup}, warmup={config.pruner_warmup})",
              "storage": config.storage.split("@")[-1],
              "search_space": "; ".join(f"{k}={v!r}" for k, v in search_space(config.method, config.params).items())}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


@dataclass
class TuneOutcome:
    study: optuna.Study
    config: TuneConfig
    run_id: str

    def counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}

    def best(self) -> FrozenTrial | None:
        try:
            return self.study.best_trial
        except ValueError:
            return None


def tune(config: TuneConfig, workers: int = 1, echo: Echo | None = None) -> TuneOutcome:
    """Run (or resume) a study until it holds ``config.trials`` finished trials."""
    check(config.spec({}))
    search_space(config.method, config.params)
    # the teacher loads (checksum, weights_only=True) before anything is written: a bad file is one line, exit 2
    load_teacher(Path(config.results), config.dataset, config.teacher)
    client = tracking.open_client(config.tracking_uri)
    experiment_id = tracking.ensure_experiment(client, config.study, Path(config.results), config.tracking_uri)
    config = TuneConfig(**{**config.__dict__, "experiment_id": experiment_id,
                           "code_version": tracking.code_version()})
    parent = study_run(client, experiment_id, config)
    config = TuneConfig(**{**config.__dict__, "parent_run_id": parent})
    status = "FINISHED"
    try:
        if workers <= 1:
            Tuner(config, echo).run()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            config = TuneConfig(**{**config.__dict__, "threads": config.threads or threads})
            study = make_study(config)  # create it once before the processes race to
            fail_stale_trials(study)
            left = max(0, config.trials - finished_count(study))
            shares = [left // workers + (i < left % workers) for i in range(workers)]
            context = multiprocessing.get_context("spawn")
            procs = [context.Process(target=tune_process, args=(config, share)) for share in shares if share]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = make_study(config)
        summary_to_mlflow(client, parent, study)
        tracking.end_run(client, parent, status)
    return TuneOutcome(study, config, parent)


def summary_to_mlflow(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Best value and parameters, and the trial counts, on the study's run."""
    trials = study.get_trials(deepcopy=False)
    for state in FINISHED_STATES:
        client.log_metric(run_id, f"trials_{state.name.lower()}", sum(t.state == state for t in trials))
    try:
        best = study.best_trial
    except ValueError:
        return
    client.log_metric(run_id, "best_val_accuracy", float(best.value))
    client.set_tag(run_id, "best_trial", str(best.number))
    client.log_text(run_id, yaml.safe_dump({"trial": best.number, "best_val_accuracy": float(best.value),
                                            "params": dict(best.params)}, sort_keys=False), "best.yaml")


def export_grid(outcome: TuneOutcome, path: Path, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """Write the best parameters as a grid file (a ``methods`` entry with ``overrides``) that ``run --grid`` accepts."""
    best = outcome.best()
    if best is None:
        raise DfkdError(f"study {outcome.config.study!r} has no complete trial yet; nothing to export")
    cfg = outcome.config
    overrides = {k: (float(v) if isinstance(v, float) else v) for k, v in best.params.items()}
    grid = {
        "name": f"{cfg.study}-best".replace(">", "").replace(" ", "_")[:120],
        "description": f"best of Optuna study {cfg.study} (trial {best.number}, best val accuracy "
                       f"{100 * best.value:.2f}%{f', tuned at {cfg.iterations} iterations' if cfg.iterations else ''})",
        "profile": cfg.profile,
        "seeds": list(seeds),
        "budgets": [cfg.collected],
        "datasets": [{"name": cfg.dataset, "teacher": cfg.teacher, "student": cfg.student}],
        "methods": [{"name": cfg.method, "overrides": overrides}],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(grid, sort_keys=False))
    return grid

