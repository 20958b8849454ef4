"""The root command group, the global options every command takes, and error handling.

Every :class:`~methods.core.errors.DfkdError` becomes a one-line ``Error: ...`` and exit code 2.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from methods.core.api import resolve_device
from methods.core.errors import DfkdError

from ..cpu_tuning import tune_malloc
from ..settings import make_settings


class UserError(click.ClickException):
    """A bad value: printed as one line, exit code 2."""

    exit_code = 2


class BenchGroup(click.Group):
    """A group that turns user errors raised anywhere below into :class:`UserError`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DfkdError as error:
            raise UserError(str(error)) from None


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dfkd-bench")
def main() -> None:
    """dfkd-bench: a benchmark suite for data-free knowledge distillation."""
    tune_malloc()  # speed only (see benchmark.cpu_tuning); DFKD_MALLOC=default turns it off


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--results``, ``--data-dir`` and ``--device`` and pass them as ``settings``."""

    @click.option("--results", "results", envvar="DFKD_RESULTS", default=None, type=click.Path(file_okay=False),
                  help="Results folder (env DFKD_RESULTS, default ./results).")
    @click.option("--data-dir", "data_dir", envvar="DFKD_DATA", default=None, type=click.Path(file_okay=False),
                  help="Dataset root in torchvision's layout (env DFKD_DATA, default ./data).")
    @click.option("--device", "device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
    @functools.wraps(func)
    def wrapper(*args: Any, results: str | None, data_dir: str | None, device: str, **kwargs: Any) -> Any:
        settings = make_settings(results, data_dir, device)
        resolve_device(settings.device)  # validate early: nothing is written on a bad device
        return func(*args, settings=settings, **kwargs)

    return wrapper


def parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--set key=value`` pairs as a dict (values are typed later against the method's dataclass)."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise DfkdError(f"bad --set {pair!r}; expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out
