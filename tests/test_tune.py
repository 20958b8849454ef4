"""Tuning: the declared search space, validation-only objective, pruning, MLflow records, resume, export."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution

from benchmark import tracking
from benchmark.cli import main
from benchmark.grid import expand, load_grid
from benchmark.teachers import default_recipe, timed_train
from benchmark.tune import TuneConfig, default_tune_storage, tune
from methods import CollectedUse, CommonHparams, DistillContext, Method, get_method
from methods.core import registry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, mnist) -> Path:
    """A LeNet-5 teacher trained briefly on 4,000 images (≈ 85-90%: plenty to tell good trials from bad)."""
    root = tmp_path_factory.mktemp("tune") / "results"
    small = dataclasses.replace(mnist, train=mnist.train.subset(torch.arange(4000)))
    recipe = dataclasses.replace(default_recipe("mnist"), epochs=2)
    timed_train(root, "mnist", "lenet5", small, recipe, seed=0, device=torch.device("cpu"))
    return root


@dataclass
class OracleHparams(CommonHparams):
    iterations: int = 20
    batch_size: int = 8
    eval_every: int = 10
    quality: str = "good"
    lr: float = 0.1


class Oracle(Method):
    """'good' predicts with the teacher (val ≈ teacher), 'bad' with the untrained student (val ≈ 10%)."""

    Hparams = OracleHparams
    collected_use = CollectedUse.NONE
    search_space = {"quality": CategoricalDistribution(["good", "bad"]), "lr": FloatDistribution(0.01, 1.0, log=True)}

    def run(self, ctx: DistillContext) -> None:
        ctx.watch(ctx.teacher.net if self.hp.quality == "good" else ctx.student)
        for i in range(1, ctx.iterations + 1):
            ctx.end_iteration(i, {"zero": torch.zeros(())})


@pytest.fixture
def oracle():
    registry.register("toy-oracle")(Oracle)
    yield
    registry._REGISTRY.pop("toy-oracle", None)


def config_for(results: Path, data_root: Path, **kw) -> TuneConfig:
    base = dict(method="toy-oracle", dataset="mnist", teacher="lenet5", student="lenet5-half", collected=0,
                profile="quick", iterations=None, seed=0, params=(), trials=3, study="oracle",
                storage=default_tune_storage(results), tracking_uri=tracking.default_tracking_uri(results),
                results=str(results), data_dir=str(data_root), device="cpu", pruner_startup=1)
    base.update(kw)
    return TuneConfig(**base)


def trial_runs(results: Path, experiment: str):
    client = tracking.open_client(tracking.default_tracking_uri(results))
    exp = tracking.find_experiment(client, experiment)
    assert exp is not None
    return client, exp, tracking.search(client, exp, "tags.`dfkd.kind` = 'trial'")


def test_weak_trial_is_pruned_and_every_trial_is_a_nested_mlflow_run(results: Path, data_root: Path, oracle) -> None:
    config = config_for(results, data_root, study="oracle-prune")
    study = optuna.create_study(study_name=config.study, storage=config.storage, direction="maximize")
    for quality in ("good", "good", "bad"):
        study.enqueue_trial({"quality": quality, "lr": 0.1})
    outcome = tune(config)
    trials = outcome.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert set(trials[0].params) == set(Oracle.search_space)  # the declared space, nothing else
    assert trials[0].value > 0.5 and trials[0].intermediate_values == {10: pytest.approx(trials[0].value), 20:
                                                                       pytest.approx(trials[0].value)}
    assert list(trials[2].intermediate_values) == [10]  # stopped at its first validation

    client, exp, runs = trial_runs(results, config.study)
    assert len(runs) == 3
    parent = {r.data.tags[tracking.PARENT] for r in runs}
    assert parent == {outcome.run_id}
    assert client.get_run(outcome.run_id).data.tags["dfkd.kind"] == "study"
    by_number = {int(r.data.tags["dfkd.trial_number"]): r for r in runs}
    states = {n: (r.data.tags["dfkd.trial_state"], r.info.status) for n, r in by_number.items()}
    assert states == {0: ("complete", "FINISHED"), 1: ("complete", "FINISHED"), 2: ("pruned", "KILLED")}
    done = by_number[0].data
    assert done.params["hp.quality"] == "good" and float(done.params["hp.lr"]) == pytest.approx(0.1)
    assert done.metrics["best_val_accuracy"] == pytest.approx(trials[0].value)
    assert "test_accuracy" not in done.metrics and "teacher_accuracy" not in done.metrics  # test never computed
    history = client.get_metric_history(by_number[2].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [10]

    # resume: the study already holds 3 finished trials; asking for 4 runs exactly one more
    again = tune(config_for(results, data_root, study="oracle-prune", trials=4))
    assert len(again.study.get_trials()) == 4
    assert len(trial_runs(results, config.study)[2]) == 4
    assert again.run_id == outcome.run_id  # the same study run, reopened


def test_failed_trial_is_recorded_and_the_study_goes_on(results: Path, data_root: Path, oracle) -> None:
    config = config_for(results, data_root, study="oracle-fail", trials=2)
    study = optuna.create_study(study_name=config.study, storage=config.storage, direction="maximize")
    study.enqueue_trial({"quality": "good", "lr": 0.1})
    original = Oracle.run

    def broken(self, ctx):
        if self.hp.lr > 0.5:
            raise RuntimeError("boom")
        original(self, ctx)

    study.enqueue_trial({"quality": "good", "lr": 0.9})
    Oracle.run = broken
    try:
        outcome = tune(config)
    finally:
        Oracle.run = original
    assert [t.state.name for t in outcome.study.get_trials()] == ["COMPLETE", "FAIL"]
    _, _, runs = trial_runs(results, config.study)
    failed = [r for r in runs if r.data.tags["dfkd.trial_state"] == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED" and "boom" in failed[0].data.tags["dfkd.error"]


def test_cli_tunes_kd_collected_and_exports_a_grid(tmp_path: Path, results: Path, data_root: Path) -> None:
    export = tmp_path / "best.yaml"
    args = ["tune", "--method", "kd-collected", "--collected", "100", "--trials", "2", "--iterations", "10",
            "--results", str(results), "--data-dir", str(data_root), "--device", "cpu", "--export", str(export),
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["complete"] == 2
    assert set(report["best"]["params"]) == set(get_method("kd-collected").search_space)
    assert 0 <= report["best"]["best_val_accuracy"] <= 1
    grid = load_grid(export)
    plan = expand(grid)
    assert [c.spec.method for c in plan.cells] == ["kd-collected"] * 3
    exported, best = dict(plan.cells[0].spec.overrides), report["best"]["params"]
    assert set(exported) == set(best) == {"lr", "objective"}
    assert exported["objective"] == best["objective"]
    assert exported["lr"] == pytest.approx(best["lr"])
    assert plan.cells[0].spec.budget.collected == 100
    assert yaml.safe_load(export.read_text())["methods"][0]["overrides"]["lr"] == pytest.approx(
        report["best"]["params"]["lr"])
    _, _, runs = trial_runs(results, report["study"])
    assert all(math.isfinite(r.data.metrics["best_val_accuracy"]) for r in runs)
    assert all("test_accuracy" not in r.data.metrics for r in runs)


@pytest.mark.parametrize("args, message", [
    (["--method", "kd-collected", "--params", "lr,momentum"], "unknown search parameter 'momentum' for method "
                                                              "'kd-collected'; allowed: lr, objective"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["tune", *args, "--results", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
