"""The ``dfkd-bench`` command line: one module per command group, registered on :data:`main`."""
from __future__ import annotations

from . import distill_cmd, methods_cmd, report_cmd, reproduce_cmd, run_cmd, teachers_cmd, tune_cmd, ui_cmd  # noqa: F401,E402  (register commands)
from .app import main

__all__ = ["main"]
