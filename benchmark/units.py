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


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, option: str = "--stop-after") -> float:
    """``90s``, ``9m``, ``1h``, ``1.5h`` or plain seconds (``600``) → seconds (> 0); anything else is a one-line error."""
    from methods.core.errors import DfkdError

    value = text.strip().lower()
    scale = _DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise DfkdError(f"bad {option} {text!r}; allowed: a positive duration such as 90s, 9m, 1h (or seconds)")
    return seconds
