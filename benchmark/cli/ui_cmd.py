"""``dfkd-bench ui``: the MLflow UI on the configured tracking store, opened on a grid's runs."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import click

from ..settings import Settings
from ..tracking import (
    VIEW_CELLS,
    VIEW_GROUPED,
    artifact_root,
    is_local,
    open_client,
    resolve_tracking_uri,
    runs_page_url,
    tag_experiment,
)
from .app import common_options, main


def ui_command_line(tracking_uri: str, artifacts: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--default-artifact-root", artifacts, "--host", host, "--port", str(port)]


def experiment_pages(tracking_uri: str, base: str, experiment: str | None) -> list[tuple[str, str, str]]:
    """(name, runs page, grouped runs page) of ``experiment``, or of every experiment with runs, newest first.

    Experiments made before the UI tags existed get them here (kind and shared views, see
    :func:`benchmark.tracking.tag_experiment`).
    """
    from methods.core.errors import DfkdError

    client = open_client(tracking_uri)
    found = [e for e in client.search_experiments() if e.lifecycle_stage == "active" and e.name != "Default"]
    if experiment is not None:
        found = [e for e in found if e.name == experiment]
        if not found:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise DfkdError(f"no MLflow experiment {experiment!r} in {tracking_uri}; found: {names}")
    pages = []
    for exp in sorted(found, key=lambda e: e.last_update_time or 0, reverse=True):
        tag_experiment(client, exp.experiment_id)
        pages.append((exp.name, runs_page_url(base, exp.experiment_id, VIEW_CELLS),
                      runs_page_url(base, exp.experiment_id, VIEW_GROUPED)))
    return pages


@main.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the UI to the network (it has no authentication).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--experiment", default=None, help="Print the runs page of this grid only (default: every grid's).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<results>/mlflow.db).")
@click.option("--print-command", is_flag=True, help="Print the command that would start the UI, and exit.")
@common_options
def ui_command(host: str, port: int, experiment: str | None, tracking_uri: str | None, print_command: bool,
               settings: Settings) -> None:
    """Start the MLflow UI on the runs of `dfkd-bench run` and print each grid's runs page (Ctrl-C stops it).

    Each address opens the grid's cell runs as a table with the accuracy, compute and time
    columns; the "grouped" address groups the seeds of a cell (mean over seeds).

    Example: dfkd-bench ui --port 5000 --experiment default
    """
    uri = resolve_tracking_uri(settings.results, tracking_uri)
    if not is_local(uri):
        click.echo(f"the tracking store is a server: open {uri} in a browser "
                   f"(a grid's runs page: {runs_page_url(uri, '<experiment id>')})")
        return
    exists = not uri.startswith("sqlite:///") or os.path.exists(uri[len("sqlite:///"):])
    command = ui_command_line(uri, artifact_root(settings.results).as_uri(), host, port)
    if print_command:
        click.echo(shlex.join(command))
        return
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if not exists:
        click.echo(f"note: {uri} does not exist yet; run a grid first (dfkd-bench run --grid)", err=True)
    else:
        for name, page, grouped in experiment_pages(uri, base, experiment):
            click.echo(f"{name}: {page}")
            click.echo(f"{name} (seeds grouped): {grouped}")
    click.echo(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it", err=True)
    sys.stdout.flush()
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(130)
