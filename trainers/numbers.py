"""Numbers as a person reads them, in the progress lines and the report card: `59,904` tokens, `14.9k tok/s`,
`87.0% (40/46)`, `4m10s`, `0.6574`. None prints as an empty cell."""
from __future__ import annotations

import math


def is_number(value) -> bool:
    """A metric's value worth a number cell or an MLflow metric: int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value) -> str:
    """Four significant digits, thousands separated, never `5.99e+04` or `0.00030000000000000003`."""
    if value is None:
        return ""
    if not is_number(value):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) >= 1000):
        return f"{int(value):,}"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def count(value) -> str:
    return "" if value is None else f"{int(value):,}"


def rate(value, unit: str) -> str:
    """`14.9k tok/s`, `2.1M tok/s`, `312 tok/s`."""
    if value is None:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix} {unit}"
    return f"{value:.3g} {unit}"


def duration(seconds) -> str:
    """`8.3 s`, `4m10s`, `2h05m`."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def percent(fraction, total=None) -> str:
    """`87.0% (40/46)` when the number of cases is known, else `87.0%`."""
    if fraction is None:
        return ""
    text = f"{100 * fraction:.1f}%"
    if total:
        text += f" ({round(fraction * total)}/{int(total)})"
    return text
