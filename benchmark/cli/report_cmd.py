"""``dfkd-bench table`` and ``dfkd-bench plot ...``: results from the MLflow store."""
from __future__ import annotations

from pathlib import Path

import click

from ..report import open_uri, plot_curves, plot_samples, plot_sensitivity, results_table
from ..settings import Settings
from .app import common_options, main

EXPERIMENT = click.option("--experiment", default=None, help="MLflow experiment (a grid's or a study's name; "
                                                             "default: every experiment).")
TRACKING = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                        help="MLflow tracking URI (default sqlite:///<results>/mlflow.db).")


@main.command("table")
@EXPERIMENT
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex"]), default="md", show_default=True)
@click.option("--metric", default="test_accuracy", show_default=True,
              help="test_accuracy (last predictor) or best_val_test_accuracy (best-val checkpoint).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="File to write (default <results>/tables/<experiment>.<ext>).")
@TRACKING
@common_options
def table_command(experiment: str | None, fmt: str, metric: str, output: str | None, tracking_uri: str | None,
                  settings: Settings) -> None:
    """Methods × (dataset, budget): test accuracy mean ± std over seeds (runs per cell), with the teacher row.

    Example: dfkd-bench table --experiment mnist-seeds --format latex
    """
    text, _ = results_table(open_uri(settings.results, tracking_uri), experiment, fmt, metric)
    path = Path(output) if output else settings.results / "tables" / \
        f"{experiment or 'all'}.{ {'md': 'md', 'csv': 'csv', 'latex': 'tex'}[fmt] }"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(text, nl=False)
    click.echo(f"wrote {path}", err=True)


@main.group("plot")
def plot_group() -> None:
    """Figures (PNG and PDF under <results>/plots, also logged to MLflow)."""


@plot_group.command("sensitivity")
@click.option("--param", required=True,
              help="A hyperparameter (e.g. lambda_d), 'collected' (the budget), 'all' (every swept one) or "
                   "'figure2' (HiDFD Figure 2: lambda_d, lambda_g, inflation, collected).")
@EXPERIMENT
@click.option("--metric", default="auto", show_default=True,
              help="auto: test_accuracy of grid runs, best_val_accuracy of study trials.")
@TRACKING
@common_options
def sensitivity_command(param: str, experiment: str | None, metric: str, tracking_uri: str | None,
                        settings: Settings) -> None:
    """Accuracy against one hyperparameter, mean ± std over seeds (HiDFD Figure 2).

    Example: dfkd-bench plot sensitivity --param figure2 --experiment hidfd-sensitivity
    """
    paths, points = plot_sensitivity(open_uri(settings.results, tracking_uri), settings.results, experiment, param,
                                     metric)
    for path in paths:
        click.echo(f"wrote {path}")


@plot_group.command("curves")
@EXPERIMENT
@TRACKING
@common_options
def curves_command(experiment: str | None, tracking_uri: str | None, settings: Settings) -> None:
    """Validation accuracy against iteration, per method (one figure per dataset, pair and budget)."""
    for path in plot_curves(open_uri(settings.results, tracking_uri), settings.results, experiment):
        click.echo(f"wrote {path}")


@plot_group.command("samples")
@click.option("--run", "run_id", default=None, help="MLflow run id (default: the latest finished run with samples).")
@EXPERIMENT
@click.option("--method", default=None, help="Latest run of this method.")
@TRACKING
@common_options
def samples_command(run_id: str | None, experiment: str | None, method: str | None, tracking_uri: str | None,
                    settings: Settings) -> None:
    """A run's generated samples (samples.png: a per-class grid)."""
    for path in plot_samples(open_uri(settings.results, tracking_uri), settings.results, run_id, experiment, method):
        click.echo(f"wrote {path}")
