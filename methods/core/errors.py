"""User-facing errors: one line naming the bad value and what is allowed.

The CLI turns every :class:`DfkdError` into a one-line message and exit code 2.
"""
from __future__ import annotations


class DfkdError(ValueError):
    """A bad value supplied by the user (method, dataset, budget, override...)."""


class BudgetError(DfkdError):
    """A method asked for more collected data than its budget allows, or a budget it cannot take."""


class PairError(DfkdError):
    """A teacher → student pair the method cannot use (e.g. a BN-less teacher for a BN-statistics method)."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite (detected at evaluation time, without per-step syncs)."""


class CheckpointError(DfkdError):
    """A checkpoint that cannot be continued: unreadable, truncated, of another run, or not to be overwritten."""


class SliceEnded(Exception):
    """A time-sliced run (``--stop-after``) reached its deadline and wrote its checkpoint; run again to continue.

    The CLI exits with :data:`EXIT_SLICE_ENDED`.
    """


EXIT_SLICE_ENDED = 75  # EX_TEMPFAIL (sysexits.h): not done yet, run the same command again
