"""``dfkd-bench reproduce``: a paper recipe as a tracked grid, then ours beside the published number (spec §5)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from methods.core.errors import EXIT_SLICE_ENDED, DfkdError

from ..grid import Plan
from ..references import load_references
from ..reproduce import (
    DEFAULT_COLLECTED,
    Comparison,
    Request,
    Target,
    hardware,
    list_lines,
    parse_pair,
    parse_seeds,
    plan_for,
    precision,
    resolve,
    summarize,
)
from ..runner import missing_teachers, run_grid
from ..settings import Settings
from ..teachers import read_manifest, teacher_dir
from ..tracking import resolve_tracking_uri
from ..units import parse_duration
from ..workqueue import default_storage
from .app import common_options, main
from .run_cmd import exit_with


def _teacher_state(plan: Plan, settings: Settings) -> list[dict[str, Any]]:
    missing = set(missing_teachers(plan, settings.results))
    out = []
    for dataset, arch in plan.teachers:
        if (dataset, arch) in missing:
            out.append({"teacher": f"{dataset}/{arch}", "cached": False, "test_accuracy": None,
                        "path": str(teacher_dir(settings.results, dataset, arch))})
        else:
            manifest = read_manifest(settings.results, dataset, arch)
            out.append({"teacher": f"{dataset}/{arch}", "cached": True, "test_accuracy": 100 * manifest["test_accuracy"],
                        "path": str(teacher_dir(settings.results, dataset, arch))})
    return out


def _dry_run(target: Target, plan: Plan, settings: Settings, uri: str, storage: str, as_json: bool) -> None:
    teachers = _teacher_state(plan, settings)
    if as_json:
        click.echo(json.dumps({
            "dry_run": True, "experiment": target.experiment, "method": target.method, "dataset": target.dataset,
            "pair": target.pair, "collected": target.collected, "seeds": list(target.request.seeds),
            "cells": [c.to_dict() for c in plan.cells], "reference_status": target.reference_status,
            "reference": None if target.reference is None else target.reference.to_dict(),
            "reference_message": target.reference_message(), "teachers": teachers,
            "tracking_uri": uri, "storage": storage}, indent=2))
        return
    click.echo(f"reproduce {target.method} on {target.dataset}: paper profile, {target.pair}, collected "
               f"{target.collected}, seeds {','.join(map(str, target.request.seeds))}, amp {target.request.amp}; "
               f"experiment {target.experiment}")
    click.echo(f"reference: {target.reference_message()}")
    if target.reference is not None and target.reference.notes:
        click.echo(f"  notes: {target.reference.notes}")
    for other in target.others:
        click.echo(f"  also published: {other.source}: {other.describe_value()}")
    click.echo(f"cells ({len(plan.cells)}):")
    for i, cell in enumerate(plan.cells, 1):
        h = cell.hparams
        click.echo(f"  {i:>2}  {cell.cell_id}  {cell.label}  iterations {h['iterations']}, batch size {h['batch_size']}")
    for t in teachers:
        if t["cached"]:
            click.echo(f"teacher {t['teacher']}: cached (test {t['test_accuracy']:.2f}%)")
        else:
            click.echo(f"teacher {t['teacher']}: not cached; a real run trains it first (spec §1.7 recipe)")
    click.echo(f"tracking: {uri}")
    click.echo(f"queue:    {storage}")
    click.echo("dry run: nothing trained (no teacher either), nothing written")


@main.command("reproduce")
@click.option("--method", default=None, help="Registered method (see `dfkd-bench methods`).")
@click.option("--dataset", default=None, help="Dataset name, e.g. mnist.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--pair", default=None, metavar="T->S",
              help="Another published pair of the method on the dataset (default: the reference's, see --list).")
@click.option("--collected", type=click.IntRange(min=0), default=None,
              help=f"Collected examples (default: 0 for data-free methods; {DEFAULT_COLLECTED} for methods that need "
                   "them, HiDFD's n_collect default, spec §3.2).")
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--list", "list_only", is_flag=True, help="Print every reference the package knows and exit.")
@click.option("--dry-run", is_flag=True, help="List the cells and the reference; train nothing, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracies in %).")
@click.option("--markdown", is_flag=True, help="Print the README 'Reproduced' table row (with its header) instead.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads per worker.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<results>/mlflow.db).")
@click.option("--storage", envvar="DFKD_QUEUE_STORAGE", default=None,
              help="Optuna RDB URL of the work queue (env DFKD_QUEUE_STORAGE; default sqlite:///<results>/queue.db).")
@click.option("--no-train-teachers", is_flag=True, help="Fail instead of training a teacher the cache lacks.")
@click.option("--stop-after", "stop_after", default=None, metavar="DURATION",
              help=f"Time slice (90s, 9m, 1h): then the running cells checkpoint and the command exits with code "
                   f"{EXIT_SLICE_ENDED}; the same command continues (a long paper recipe as a series of commands).")
@click.option("--iterations", type=click.IntRange(min=1), default=None, hidden=True,
              help="Smoke tests only: override the recipe's iterations (not the paper recipe; own experiment).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, hidden=True,
              help="Smoke tests only: override the recipe's batch size (not the paper recipe; own experiment).")
@common_options
def reproduce_command(method: str | None, dataset: str | None, seeds: str, pair: str | None, collected: int | None,
                      amp: str, list_only: bool, dry_run: bool, as_json: bool, markdown: bool, workers: int,
                      threads: int | None, tracking_uri: str | None, storage: str | None, no_train_teachers: bool,
                      stop_after: str | None, iterations: int | None, batch_size: int | None, settings: Settings) -> None:
    """Run a method's paper recipe on the paper's pair and set it beside the published number (spec §5).

    The run is a tracked grid (experiment reproduce-<method>-<dataset>): a re-run skips finished
    cells.  Prints ours (mean ± sample std over seeds of the last and the best-val test accuracy,
    teacher, wall per run) beside the published value, its source and its teacher; the gap to the
    teacher for both; and a verdict on best-val: within the published spread (±0.5 points when
    none is given), below or above.  HiDFD, CGDD and CPSC-DFKD have no verified number (spec §5.7).
    Exit codes as `run --grid`: 0 all seeds finished, 1 some did not, 2 bad input, 75 when --stop-after
    ended the time slice (run the same command again: the cells resume from their checkpoints), 130 interrupted.

    Examples: dfkd-bench reproduce --list;  dfkd-bench reproduce --method dfad --dataset mnist --dry-run;
    dfkd-bench reproduce --method dfad --dataset mnist --seeds 0 --amp bf16
    """
    seconds = parse_duration(stop_after) if stop_after is not None else None
    references = load_references()
    if as_json and markdown:
        raise DfkdError("give --json or --markdown, not both")
    if list_only:
        if as_json:
            click.echo(json.dumps({"references": [e.to_dict() for e in references.entries],
                                   "unavailable": [u.to_dict() for u in references.unavailable]}, indent=2))
        else:
            click.echo("\n".join(list_lines(references)))
        return
    if method is None or dataset is None:
        raise DfkdError("give --method and --dataset (or --list to see the references)")
    request = Request(method, dataset, parse_seeds(seeds), collected, parse_pair(pair) if pair else None,
                      iterations, batch_size, amp)
    target = resolve(request, references)
    plan = plan_for(target)
    uri = resolve_tracking_uri(settings.results, tracking_uri)
    storage_url = storage or default_storage(settings.results)
    if dry_run:
        _dry_run(target, plan, settings, uri, storage_url, as_json)
        return
    outcome = run_grid(plan, settings, workers=workers, tracking_uri=uri, storage=storage_url, threads=threads,
                       train_teachers=not no_train_teachers, echo=lambda line: click.echo(line, err=True),
                       live=sys.stderr.isatty(), stop_after=seconds)
    device = settings.torch_device
    comparison = Comparison(target, summarize(outcome.rows), hardware(device), precision(amp, device),
                            outcome.tracking_uri, outcome.experiment_id,
                            {"wall_seconds": outcome.wall_seconds, "interrupted": outcome.interrupted})
    if as_json:
        click.echo(json.dumps(comparison.to_dict(), indent=2))
    elif markdown:
        click.echo(comparison.markdown())
    else:
        click.echo(comparison.text())
    exit_with(outcome, stop_after)
