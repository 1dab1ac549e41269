"""Confidence intervals over seeds (Student t, 95%), without scipy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: two-sided 95% Student-t quantiles t_{0.975, df} (standard tables, 4 decimals)
_T975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060,
    9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
    16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739,
    23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
    30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
_Z975 = 1.95996


def t975(df: int) -> float:
    """t_{0.975, df}: exact table values up to 30, then linear in 1/df between table rows
    (the usual table interpolation; error < 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    knots = [(30, _T975[30]), (40, _T975[40]), (60, _T975[60]), (120, _T975[120]), (math.inf, _Z975)]
    for (d0, t0), (d1, t1) in zip(knots, knots[1:]):
        if d0 < df < d1:
            u0, u1, u = 1 / d0, (0.0 if d1 == math.inf else 1 / d1), 1 / df
            return t1 + (t0 - t1) * (u - u1) / (u0 - u1)
    return _Z975


@dataclass
class MeanCI:
    n: int
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None for n < 2
    half_width: float | None  # 95% t-interval half-width; None for n < 2 (no spread to estimate)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        """``0.400 ± 0.248`` / ``0.400 (n/a, 1 seed)`` / ``n/a``."""
        if self.mean is None:
            return "n/a"
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (CI n/a, 1 seed)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float]) -> MeanCI:
    """Mean and 95% Student-t confidence interval: mean ± t_{0.975, n-1} · s / sqrt(n)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return MeanCI(0, None, None, None)
    m = sum(xs) / n
    if n == 1:
        return MeanCI(1, m, None, None)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return MeanCI(n, m, s, t975(n - 1) * s / math.sqrt(n))
