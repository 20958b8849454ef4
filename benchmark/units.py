"""Human-readable counts for tables and terminal output."""
from __future__ import annotations

import math


def si(value: float | None) -> str:
    """A count with an SI suffix: 15738 → ``15.7k``, 2.24e9 → ``2.24G``; ``–`` when missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
