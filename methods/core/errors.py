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
