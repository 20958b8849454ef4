"""Host-sync guard: the step loops run under ``torch.cuda.set_sync_debug_mode("error")`` (issue 15).

Speed rule (README "How we build"): no per-step ``.item()``, ``float(tensor)``, ``torch.tensor(...)``
from host values, boolean-mask indexing or ``bincount`` in a hot loop; on CUDA each one blocks the
host until the device has caught up.  With the guard on, every host-device synchronisation inside
a method's iteration body raises ``RuntimeError`` on CUDA, naming the call in its traceback.

What the harness does sparsely is allowed (:meth:`SyncGuard.allowed`): validation, metric logging,
artifacts, run totals, and checkpoint writing between iterations.  On a CPU device the guard changes
nothing (CPU tensors never synchronise); :func:`set_mode` is the one place that calls CUDA, so the
switching itself is tested on CPU.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def set_mode(mode: str) -> None:
    """``torch.cuda.set_sync_debug_mode(mode)`` (``"error"`` or ``"default"``); nothing without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


class SyncGuard:
    """Switches the sync debug mode to ``"error"`` for iteration bodies when ``enabled``.

    ``stage_limit``: end every stage after that many iterations (a sync check of each stage's loop
    body, :mod:`benchmark.sync_check`; never set for a real run).
    """

    def __init__(self, enabled: bool, stage_limit: int | None = None) -> None:
        self.enabled = enabled
        self.stage_limit = stage_limit
        self.mode = "default"

    def _switch(self, mode: str) -> None:
        if self.enabled and mode != self.mode:
            set_mode(mode)
            self.mode = mode

    def loop(self, iterations: Iterable[int]) -> Iterator[int]:
        """Yield ``iterations``; each iteration's body runs with syncs as errors, what is between them not."""
        iterator = iter(iterations)
        done = 0
        while True:
            self._switch("default")  # the checkpointer writes between iterations
            if self.stage_limit is not None and done >= self.stage_limit:
                return
            try:
                it = next(iterator)
            except StopIteration:
                return
            done += 1
            self._switch("error")
            try:
                yield it
            finally:
                self._switch("default")

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """Inside an iteration: a sparse harness step that may synchronise (validation, logging)."""
        previous = self.mode
        self._switch("default")
        try:
            yield
        finally:
            self._switch(previous)

    def close(self) -> None:
        """Back to ``"default"`` (the run ended, or its body raised inside an iteration)."""
        self._switch("default")
