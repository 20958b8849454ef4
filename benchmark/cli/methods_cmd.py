"""``dfkd-bench methods``: the registered methods and what they declare."""
from __future__ import annotations

import json

import click

from methods.core.registry import get_method, method_names

from ..settings import Settings
from .app import common_options, main


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value) or "()"
    return str(value)


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@common_options
def methods_command(as_json: bool, settings: Settings) -> None:
    """List registered methods: family, budgets accepted, hyperparameters, search space.

    Example: dfkd-bench methods
    """
    described = [get_method(name).describe() for name in method_names()]
    if as_json:
        click.echo(json.dumps(described, indent=2, default=str))
        return
    for info in described:
        click.secho(f"{info['name']}", bold=True, nl=False)
        click.echo(f"  [{info['family']}]  collected: {info['collected']}  profiles: {', '.join(info['profiles'])}")
        click.echo(f"    deployed: {info['deployed']}")
        if info["notes"]:
            click.echo(f"    note: {info['notes']}")
        params = "  ".join(f"{k}={_format_value(v)}" for k, v in info["hparams"].items())
        click.echo(f"    hyperparameters: {params}")
        space = "  ".join(f"{k}∈{v}" for k, v in info["search_space"].items()) or "(none)"
        click.echo(f"    search space: {space}")
        click.echo(f"    cite: {info['citation']}")
