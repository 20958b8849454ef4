"""``dfkd-bench tune``: TPE search of a method's declared search space on validation accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import click
import optuna

from ..settings import Settings
from ..tracking import resolve_tracking_uri
from ..tune import TuneConfig, default_study_name, default_tune_storage, export_grid, search_space, tune
from .app import common_options, main


@main.command("tune")
@click.option("--method", required=True, help="A registered method (see `dfkd-bench methods`).")
@click.option("--dataset", default="mnist", show_default=True)
@click.option("--teacher", default="lenet5", show_default=True)
@click.option("--student", default="lenet5-half", show_default=True)
@click.option("--collected", type=click.IntRange(min=0), default=0, show_default=True,
              help="Collected real examples (the budget).")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True,
              help="Finished trials the study should hold (a resumed study runs only the missing ones).")
@click.option("--params", default=None, metavar="LIST",
              help="Tune only these parameters of the declared search space (comma-separated).")
@click.option("--profile", default="quick", show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Iterations per trial (default: profile).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every trial's run.")
@click.option("--study", "study_name", default=None, help="Study name (default from method, dataset, pair, budget, "
              "profile, iterations); also the MLflow experiment.")
@click.option("--storage", envvar="DFKD_TUNE_STORAGE", default=None,
              help="Optuna storage URL (env DFKD_TUNE_STORAGE; default sqlite:///<results>/tune.db).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes on one study.")
@click.option("--pruner-startup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Trials completed before the median pruner stops any.")
@click.option("--pruner-warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Iterations before a trial may be pruned.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (default sqlite:///<results>/mlflow.db).")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None,
              help="Write the best parameters as a grid file (methods[0].overrides) for `run --grid`.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
def tune_command(method: str, dataset: str, teacher: str, student: str, collected: int, trials: int,
                 params: str | None, profile: str, iterations: int | None, seed: int, study_name: str | None,
                 storage: str | None, workers: int, pruner_startup: int, pruner_warmup: int,
                 tracking_uri: str | None, export_path: str | None, as_json: bool, settings: Settings) -> None:
    """Tune a method's declared search space with TPE, maximising best validation accuracy.

    Test accuracy is never computed during the search (spec §1.5).  Weak trials are pruned on
    their intermediate validation accuracy (median rule).  Every trial is an MLflow run nested
    under the study's run.  Re-running the same command resumes the study.

    Example: dfkd-bench tune --method kd-collected --collected 100 --trials 30 --iterations 500 --export best.yaml
    """
    names = tuple(p.strip() for p in params.split(",") if p.strip()) if params else ()
    search_space(method, names)
    name = study_name or default_study_name(method, dataset, teacher, student, collected, profile, iterations)
    config = TuneConfig(
        method=method, dataset=dataset, teacher=teacher, student=student, collected=collected, profile=profile,
        iterations=iterations, seed=seed, params=names, trials=trials, study=name,
        storage=storage or default_tune_storage(settings.results),
        tracking_uri=resolve_tracking_uri(settings.results, tracking_uri), results=str(settings.results),
        data_dir=str(settings.data_dir), device=settings.device, pruner_startup=pruner_startup,
        pruner_warmup=pruner_warmup,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outcome = tune(config, workers, echo=None if as_json else (lambda line: click.echo(line, err=True)))
    counts = outcome.counts()
    best = outcome.best()
    exported = None
    if export_path:
        export_grid(outcome, Path(export_path))
        exported = str(export_path)
    if as_json:
        click.echo(json.dumps({
            "study": name, "storage": config.storage, "counts": counts,
            "best": None if best is None else {"trial": best.number, "best_val_accuracy": best.value,
                                               "params": best.params},
            "mlflow_run_id": outcome.run_id, "export": exported,
        }, indent=2, default=str))
        return
    click.echo(f"study {name}: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed "
               f"(storage {config.storage})")
    if best is not None:
        click.echo(f"best trial {best.number}: best val accuracy {100 * best.value:.2f}%  "
                   + " ".join(f"{k}={v}" for k, v in best.params.items()))
    if exported:
        click.echo(f"wrote {exported}: run it with `dfkd-bench run --grid {exported}`")
