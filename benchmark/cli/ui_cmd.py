"""``dfkd-bench ui``: the MLflow UI on the configured tracking store."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import click

from ..settings import Settings
from ..tracking import artifact_root, is_local, resolve_tracking_uri
from .app import common_options, main


def ui_command_line(tracking_uri: str, artifacts: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--default-artifact-root", artifacts, "--host", host, "--port", str(port)]


@main.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the UI to the network (it has no authentication).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default sqlite:///<results>/mlflow.db).")
@click.option("--print-command", is_flag=True, help="Print the command that would start the UI, and exit.")
@common_options
def ui_command(host: str, port: int, tracking_uri: str | None, print_command: bool, settings: Settings) -> None:
    """Start the MLflow UI on the runs of `dfkd-bench run` (Ctrl-C stops it).

    Example: dfkd-bench ui --port 5000   (then open http://127.0.0.1:5000)
    """
    uri = resolve_tracking_uri(settings.results, tracking_uri)
    if not is_local(uri):
        click.echo(f"the tracking store is a server: open {uri} in a browser")
        return
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]) and not print_command:
        click.echo(f"note: {uri} does not exist yet; run a grid first (dfkd-bench run --grid)", err=True)
    command = ui_command_line(uri, artifact_root(settings.results).as_uri(), host, port)
    if print_command:
        click.echo(shlex.join(command))
        return
    click.echo(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it", err=True)
    try:
        sys.exit(subprocess.call(command))
    except KeyboardInterrupt:
        sys.exit(130)
