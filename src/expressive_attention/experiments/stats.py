"""Statistics for the ladder's verdicts: a t-interval for differences of means over seeds, and the
capacity-equivalent factor (how many times more steps or parameters DPA needs to match EA).

    gap = gap_interval(ea_scores, dpa_scores)      # Welch t-interval of mean(EA) - mean(DPA), 95%
    gap.low > 0                                    # EA ahead beyond seed noise
    f = equivalent_factor([450, 1350, 4050], dpa_means, target=ea_mean, x_ref=450)
    f.factor, f.status                             # e.g. 2.4, "reached"
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # two-sided confidence level of every interval in the ladder reports
SOLVED = 0.999  # sequence accuracy that counts as "100%"


@dataclass(frozen=True)
class Interval:
    estimate: float  # the contrast of the means, e.g. mean(EA) - mean(DPA)
    low: float
    high: float
    df: float  # Welch-Satterthwaite degrees of freedom (inf when every group has zero spread)
    n: tuple[int, ...]  # seeds per group

    @property
    def sign(self) -> int:
        """+1 if the interval lies above 0, -1 if below, 0 if it contains 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with df degrees of freedom (df = inf: the normal quantile)."""
    from scipy.stats import norm, t
    return float(norm.ppf(p) if math.isinf(df) else t.ppf(p, df))


def contrast_interval(groups: Sequence[Sequence[float]], coefs: Sequence[float],
                      level: float = LEVEL) -> Interval:
    """Welch t-interval for sum_i coefs[i] * mean(groups[i]), groups independent, unequal variances.

    se^2 = sum_i c_i^2 s_i^2 / n_i (s_i: sample std, ddof 1);
    df = (sum_i c_i^2 s_i^2 / n_i)^2 / sum_i (c_i^2 s_i^2 / n_i)^2 / (n_i - 1)  (Welch-Satterthwaite).
    The gap EA - DPA is coefs (1, -1); the change of that gap between two budgets is (1, -1, -1, 1).
    Every group needs >= 2 values (a single seed has no spread to judge noise by).
    """
    if len(groups) != len(coefs) or not groups:
        raise ValueError(f"groups ({len(groups)}) and coefs ({len(coefs)}) must be non-empty and of equal length")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    arrays = [np.asarray(g, dtype=float) for g in groups]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or a.size < 2:
            raise ValueError(f"groups[{i}] needs >= 2 values (seeds), got {a.size}")
    est = float(sum(c * a.mean() for c, a in zip(coefs, arrays)))
    parts = [c * c * a.var(ddof=1) / a.size for c, a in zip(coefs, arrays)]  # c_i^2 s_i^2 / n_i
    var = float(sum(parts))
    if var <= 0.0:
        return Interval(est, est, est, math.inf, tuple(a.size for a in arrays))
    df = var * var / sum(p * p / (a.size - 1) for p, a in zip(parts, arrays) if p > 0)
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var)
    return Interval(est, est - half, est + half, df, tuple(a.size for a in arrays))


def gap_interval(ea: Sequence[float], dpa: Sequence[float], level: float = LEVEL) -> Interval:
    """mean(ea) - mean(dpa) with its Welch t-interval (seeds as independent draws)."""
    return contrast_interval([ea, dpa], [1.0, -1.0], level)


@dataclass(frozen=True)
class Factor:
    status: str  # "reached" | "already" (DPA's first point matches) | "not reached" (never within the axis)
    factor: float | None  # x at which DPA matches, divided by x_ref (for "already": an upper bound)
    x: float | None  # the matching x (log-linear interpolation between the axis points)

    def fmt(self) -> str:
        if self.status == "reached":
            return f"{self.factor:.2g}x"
        if self.status == "already":
            return f"<= {self.factor:.2g}x"
        return f"not reached (> {self.factor:.2g}x)" if self.factor else "not reached"


def equivalent_factor(xs: Sequence[float], ys: Sequence[float], target: float, x_ref: float) -> Factor:
    """How many times x_ref DPA needs (steps or parameters) to reach `target` (EA's score at x_ref).

    xs: the axis points, increasing (e.g. steps 450, 1350, 4050); ys: DPA's mean score at each.
    The first crossing of `target`, interpolating ys linearly in log x between neighbouring points.
    If DPA's first point already reaches it: status "already", factor xs[0] / x_ref (an upper bound).
    If no point reaches it: status "not reached", factor xs[-1] / x_ref (the factor is larger than that).
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 1:
        raise ValueError(f"xs and ys must be 1-d of equal, non-zero length, got {xs.shape} and {ys.shape}")
    if np.any(xs <= 0) or np.any(np.diff(xs) <= 0) or not x_ref > 0:
        raise ValueError("xs must be positive and strictly increasing, and x_ref positive")
    if ys[0] >= target:
        return Factor("already", float(xs[0] / x_ref), float(xs[0]))
    for i in range(1, xs.size):
        if ys[i] >= target:
            lx0, lx1 = math.log(xs[i - 1]), math.log(xs[i])
            frac = (target - ys[i - 1]) / (ys[i] - ys[i - 1])  # ys[i-1] < target <= ys[i]
            x = math.exp(lx0 + frac * (lx1 - lx0))
            return Factor("reached", x / x_ref, x)
    return Factor("not reached", float(xs[-1] / x_ref), None)
