"""``dfkd-bench run --grid [FILE]``: a grid of cells, recorded in MLflow, resumable, on several workers."""
from __future__ import annotations

import json
import math
import sys

import click

from methods.core.errors import EXIT_SLICE_ENDED, DfkdError

from ..grid import DEFAULT_GRID, Plan, describe_grid, expand, load_grid
from ..launchers import SlurmOptions
from ..runner import Outcome, missing_teachers, run_grid
from ..settings import Settings
from ..tracking import resolve_tracking_uri
from ..units import parse_duration, si
from ..workqueue import DEFAULT_HEARTBEAT, default_storage
from .app import common_options, main


def _percent(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def print_plan(plan: Plan, settings: Settings, tracking_uri: str, storage: str) -> None:
    grid = plan.grid
    click.echo(f"grid {grid.name} ({grid.source}): {len(plan.cells)} cells, {len(plan.skipped)} skipped")
    header = f"{'#':>3}  {'cell id':<16}  {'method':<14}{'dataset':<14}{'pair':<24}{'collected':>9}{'seed':>6}  " \
             f"{'profile':<8}{'iterations':>10}"
    click.echo(header)
    for i, cell in enumerate(plan.cells, 1):
        s = cell.spec
        click.echo(f"{i:>3}  {cell.cell_id:<16}  {s.method:<14}{s.dataset:<14}{cell.pair:<24}{s.budget.collected:>9}"
                   f"{s.seed:>6}  {s.profile:<8}{cell.hparams['iterations']:>10}")
    if plan.skipped:
        click.echo("skipped:")
        for skip in plan.skipped:
            click.echo(f"  {skip.label}: {skip.reason}")
    missing = missing_teachers(plan, settings.results)
    for dataset, arch in missing:
        click.echo(f"teacher {dataset}/{arch} is not cached: it will be trained first (spec §1.7 recipe)")
    click.echo(f"tracking: {tracking_uri}")
    click.echo(f"queue:    {storage}")


def print_outcome(outcome: Outcome) -> None:
    click.echo(f"{'method':<14}{'dataset':<10}{'pair':<24}{'coll':>6}{'seed':>5}  {'status':<9}"
               f"{'test':>7}{'bv-test':>8}{'teacher':>8}{'wall s':>8}{'params':>9}{'train FLOPs':>12}")
    for row in outcome.rows:
        s = row.cell.spec
        m = row.metrics
        wall = m.get("wall_seconds")
        click.echo(f"{s.method:<14}{s.dataset:<10}{row.cell.pair:<24}{s.budget.collected:>6}{s.seed:>5}  "
                   f"{row.status:<9}{_percent(m.get('test_accuracy')):>7}{_percent(m.get('best_val_test_accuracy')):>8}"
                   f"{_percent(m.get('teacher_accuracy')):>8}{'' if wall is None else f'{wall:.1f}':>8}"
                   f"{si(m.get('student_parameters')):>9}{si(m.get('train_flops')):>12}")
        if row.error:
            click.echo(f"    error: {row.error.splitlines()[0][:300]}")
    for skip in outcome.plan.skipped:
        click.echo(f"skipped {skip.label}: {skip.reason}")
    failed = len(outcome.failed)
    state = "interrupted" if outcome.interrupted else ("done" if not failed else f"{failed} cell(s) not finished")
    click.echo(f"grid {outcome.plan.grid.name}: {len(outcome.rows) - failed}/{len(outcome.rows)} finished, "
               f"{len(outcome.plan.skipped)} skipped, {state}; wall {outcome.wall_seconds:.0f} s")
    click.echo(f"MLflow: experiment {outcome.experiment_id} ({outcome.plan.grid.name}) in {outcome.tracking_uri}; "
               "see `dfkd-bench ui`")


@main.command("run")
@click.option("--grid", "grid_ref", is_flag=False, flag_value=DEFAULT_GRID, default=DEFAULT_GRID, metavar="[FILE|NAME]",
              show_default=True,
              help="Grid YAML file, or a packaged grid's name (default, smoke, mnist-seeds, ...); "
                   "alone: the built-in default grid.")
@click.option("--dry-run", is_flag=True, help="List the cells and the skipped ones; run nothing, write nothing.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: one per --devices entry, else 1).")
@click.option("--devices", default=None, metavar="LIST",
              help="Comma-separated devices, one per worker in turn, e.g. cuda:0,cuda:1.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Override every method's iterations (a smoke test; the cells get new ids).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<results>/mlflow.db).")
@click.option("--storage", envvar="DFKD_QUEUE_STORAGE", default=None,
              help="Optuna RDB URL of the work queue (env DFKD_QUEUE_STORAGE; default sqlite:///<results>/queue.db). "
                   "Machines sharing one storage and one MLflow server split the grid.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=DEFAULT_HEARTBEAT, show_default=True,
              help="Seconds between a worker's heartbeats; a cell silent for 3x this is retried elsewhere.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads per worker (default: torch's choice with one worker, cores / workers with several).")
@click.option("--launcher", type=click.Choice(["processes", "local", "slurm"]), default="processes", show_default=True,
              help="Where the --workers run: processes here; slurm: one submitit job array on the shared queue "
                   "(prints the job id and returns); local: submitit's local executor (what the tests run).")
@click.option("--slurm-partition", default=None, help="Slurm partition of the job array (--launcher slurm).")
@click.option("--slurm-gpus-per-task", type=click.IntRange(min=0), default=None, help="GPUs per Slurm task (worker).")
@click.option("--slurm-cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per Slurm task (worker).")
@click.option("--slurm-time", default="4:00:00", show_default=True,
              help="Time limit per worker job in Slurm's format ([D-]HH:MM:SS or minutes); also the local jobs' limit. "
                   "A job that reaches it is requeued and its cell re-runs.")
@click.option("--no-train-teachers", is_flag=True, help="Fail instead of training a teacher the cache lacks.")
@click.option("--stop-after", "stop_after", default=None, metavar="DURATION",
              help=f"Time slice (90s, 9m, 1h): then the running cells checkpoint and the command exits with code "
                   f"{EXIT_SLICE_ENDED}; the same command continues.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (cells, or outcomes; accuracies as fractions).")
@common_options
def run_command(grid_ref: str, dry_run: bool, workers: int | None, devices: str | None, iterations: int | None,
                tracking_uri: str | None, storage: str | None, heartbeat: int, threads: int | None, launcher: str,
                slurm_partition: str | None, slurm_gpus_per_task: int | None, slurm_cpus_per_task: int | None,
                slurm_time: str, no_train_teachers: bool, stop_after: str | None, as_json: bool,
                settings: Settings) -> None:
    """Run a grid: methods × datasets × collected budgets × seeds, every cell an MLflow run.

    Re-running the same grid skips finished cells and resumes failed or interrupted ones from their
    last checkpoint (<results>/checkpoints/<grid>/<cell_id>.pt, written at each evaluation),
    continuing the cell's MLflow run.  Exit code 0 when every cell finished, 1 when some did not,
    75 when --stop-after ended the time slice (run the same command again), 130 when interrupted.

    Examples: dfkd-bench run --grid --dry-run;  dfkd-bench run --grid;
    dfkd-bench run --grid benchmark/grids/mnist-seeds.yaml --workers 2;
    dfkd-bench run --grid g.yaml --storage postgresql://u@db/queue --tracking-uri http://mlflow:5000
    --launcher slurm --slurm-partition gpu --slurm-gpus-per-task 1 --workers 8
    """
    seconds = parse_duration(stop_after) if stop_after is not None else None
    device_list = tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else ()
    if devices is not None and not device_list:
        raise DfkdError(f"bad --devices {devices!r}; expected a comma-separated list, e.g. cuda:0,cuda:1")
    from methods.core.api import resolve_device

    for device in device_list:
        resolve_device(device)
    n_workers = workers or max(1, len(device_list))
    grid = load_grid(grid_ref)
    if iterations is not None:
        grid = grid.with_iterations(iterations)
    plan = expand(grid)
    uri = resolve_tracking_uri(settings.results, tracking_uri)
    storage_url = storage or default_storage(settings.results)
    if dry_run:
        if as_json:
            click.echo(json.dumps({**describe_grid(plan), "tracking_uri": uri, "storage": storage_url}, indent=2))
        else:
            print_plan(plan, settings, uri, storage_url)
        return
    if not plan.cells:
        raise DfkdError(f"grid {grid.name} has no cell to run ({len(plan.skipped)} skipped); see --dry-run")
    slurm = SlurmOptions(slurm_partition, slurm_gpus_per_task, slurm_time, slurm_cpus_per_task)
    outcome = run_grid(
        plan, settings, workers=n_workers, devices=device_list, tracking_uri=uri, storage=storage_url,
        heartbeat=heartbeat, threads=threads, train_teachers=not no_train_teachers, echo=lambda line: click.echo(line, err=True),
        live=sys.stderr.isatty() and launcher != "slurm", launcher=launcher, slurm=slurm, stop_after=seconds,
    )
    if outcome.submitted is not None:
        if as_json:
            click.echo(json.dumps({"grid": grid.name, "slurm_job": outcome.submitted, "workers": n_workers,
                                   "experiment_id": outcome.experiment_id, "tracking_uri": outcome.tracking_uri}))
        else:
            click.echo(f"submitted {n_workers} worker(s) as Slurm job array {outcome.submitted} "
                       f"(squeue -j {outcome.submitted}); cells are recorded in {outcome.tracking_uri}")
        return
    if as_json:
        click.echo(json.dumps({
            "grid": grid.name, "experiment_id": outcome.experiment_id, "parent_run_id": outcome.parent_run_id,
            "tracking_uri": outcome.tracking_uri, "wall_seconds": outcome.wall_seconds,
            "interrupted": outcome.interrupted, "stopped": outcome.stopped, "cells": [r.to_dict() for r in outcome.rows],
            "skipped": [{"cell": s.label, "reason": s.reason} for s in plan.skipped],
        }, indent=2))
    else:
        print_outcome(outcome)
    exit_with(outcome, stop_after)


def exit_with(outcome: Outcome, stop_after: str | None) -> None:
    """Say why a grid stopped early (interrupted / time slice ended), then exit with the grid's code."""
    if outcome.interrupted:
        click.echo("interrupted: running cells were marked KILLED; run the same command again to resume", err=True)
    elif outcome.stopped:
        click.echo(f"time slice ended (--stop-after {stop_after}): running cells checkpointed; "
                   f"run the same command again to continue (exit code {EXIT_SLICE_ENDED})", err=True)
    sys.exit(outcome.exit_code)
