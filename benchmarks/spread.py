"""Over-seed numbers as every table prints them: the mean and ``mean ± half range``.

A leaf (imports nothing of benchmarks/), so that the method table (`benchmarks.report`) and the blocks it renders
from other modules (`benchmarks.product_report`) share one formula without importing each other.
"""

from __future__ import annotations


def stat(vals: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """mean ± half range (with 2 seeds: half the difference), or the single value; "-" without any."""
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "-"
    mean = round(sum(vals) / len(vals), 12)
    half = (max(vals) - min(vals)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(vals) > 1 else f"{mean:.{digits}f}"


def mean(vals: list[float | None]) -> float | None:
    """The mean, rounded off float noise (0.967 and 0.966 average to 0.9665, not 0.96649999...)."""
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / len(vals), 12) if vals else None


def signed(v: float | None) -> str:
    """A difference in points, signed, 2 decimals; "-" without one. Rounded first: a level pair reads +0.00, never
    -0.00."""
    return "-" if v is None else f"{round(v, 2) + 0.0:+.2f}"
