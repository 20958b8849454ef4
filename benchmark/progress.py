"""A progress bar on stderr for long runs (click's progress bar), as a method callback."""
from __future__ import annotations

import sys
from typing import Any

import click

from methods.core.context import BaseCallback


class ProgressBar(BaseCallback):
    """Shows iterations done / total with ETA and the latest validation accuracy."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.done = 0

    def on_progress(self, iteration: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_eta=True, show_pos=True)
            self.bar.__enter__()
        self.bar.update(iteration - self.done)
        self.done = iteration

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None and "val_accuracy" in metrics:
            self.bar.label = f"{self.label} val {100 * metrics['val_accuracy']:.2f}%"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
