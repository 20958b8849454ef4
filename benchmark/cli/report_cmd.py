"""``dfkd-bench table`` and ``dfkd-bench plot ...``: results from the MLflow store."""
from __future__ import annotations

from pathlib import Path

import click

from ..report import (
    LAYOUTS,
    open_uri,
    plot_budget,
    plot_compute,
    plot_curves,
    plot_samples,
    plot_sensitivity,
    results_table,
)
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
@click.option("--layout", type=click.Choice(LAYOUTS), default="long", show_default=True,
              help="long: a row per method, run counts per cell (csv: one row per cell); paper: a row per method "
                   "and objective, (dataset, budget) columns, mean ± std over the seeds, the teacher once.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="File to write (default <results>/tables/<experiment>[-paper].<ext>).")
@TRACKING
@common_options
def table_command(experiment: str | None, fmt: str, metric: str, layout: str, output: str | None,
                  tracking_uri: str | None, settings: Settings) -> None:
    """Methods × (dataset, budget): test accuracy mean ± std over seeds (runs per cell), with the teacher row.

    Example: dfkd-bench table --experiment mnist-seeds --format latex --layout paper
    """
    text, _ = results_table(open_uri(settings.results, tracking_uri), experiment, fmt, metric, layout)
    suffix = "-paper" if layout == "paper" else ""
    path = Path(output) if output else settings.results / "tables" / \
        f"{experiment or 'all'}{suffix}.{ {'md': 'md', 'csv': 'csv', 'latex': 'tex'}[fmt] }"
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
@click.option("--reference-method", default="kd-collected", show_default=True,
              help="Its runs are drawn as reference lines at each panel's budget (not swept); '' for none.")
@click.option("--reference-experiment", default=None,
              help="Take the reference runs from this experiment (default: the plotted one).")
@TRACKING
@common_options
def sensitivity_command(param: str, experiment: str | None, metric: str, reference_method: str,
                        reference_experiment: str | None, tracking_uri: str | None, settings: Settings) -> None:
    """Accuracy against one hyperparameter, mean ± std over seeds (HiDFD Figure 2), with KD-collected and the teacher.

    Example: dfkd-bench plot sensitivity --param figure2 --experiment hidfd-sensitivity
    """
    paths, points = plot_sensitivity(open_uri(settings.results, tracking_uri), settings.results, experiment, param,
                                     metric, reference_method or None, reference_experiment)
    for path in paths:
        click.echo(f"wrote {path}")


@plot_group.command("budget")
@EXPERIMENT
@click.option("--metric", default="test_accuracy", show_default=True,
              help="test_accuracy (last predictor) or best_val_test_accuracy (best-val checkpoint).")
@TRACKING
@common_options
def budget_command(experiment: str | None, metric: str, tracking_uri: str | None, settings: Settings) -> None:
    """Accuracy against the number of collected examples, mean ± std over seeds; data-free methods and teacher as lines.

    Example: dfkd-bench plot budget --experiment hidfd-budget-cpu
    """
    plotted = plot_budget(open_uri(settings.results, tracking_uri), settings.results, experiment, metric)
    for path in plotted.paths:
        click.echo(f"wrote {path}")


@plot_group.command("compute")
@EXPERIMENT
@click.option("--x", "x_axis", type=click.Choice(["flops", "wall"]), default="flops", show_default=True,
              help="flops: train_flops (every network, forward and backward); wall: wall_seconds.")
@click.option("--metric", default="test_accuracy", show_default=True)
@TRACKING
@common_options
def compute_command(experiment: str | None, x_axis: str, metric: str, tracking_uri: str | None,
                    settings: Settings) -> None:
    """Accuracy against the compute each run spent (log axis), one point per run, one colour per method.

    Example: dfkd-bench plot compute --experiment default --x wall
    """
    plotted = plot_compute(open_uri(settings.results, tracking_uri), settings.results, experiment, x_axis, metric)
    for path in plotted.paths:
        click.echo(f"wrote {path}")


@plot_group.command("curves")
@EXPERIMENT
@click.option("--metric", default="val_accuracy", show_default=True,
              help="A metric logged at every evaluation: val_accuracy, best_val_accuracy, loss/<term>, or a probe "
                   "of the teacher's last training batch: probe/class_coverage, probe/agreement, "
                   "probe/teacher_confidence, probe/teacher_logit_abs.")
@TRACKING
@common_options
def curves_command(experiment: str | None, metric: str, tracking_uri: str | None, settings: Settings) -> None:
    """A per-evaluation metric (validation accuracy by default) against iteration, per method (one figure per
    dataset, pair and budget).

    Example: dfkd-bench plot curves --experiment default --metric probe/class_coverage
    """
    for path in plot_curves(open_uri(settings.results, tracking_uri), settings.results, experiment, metric):
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
