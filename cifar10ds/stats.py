"""Statistics for many-seed experiments: mean, std, Student-t confidence intervals, Welch's test.

The way the airbench-style report judges a change: never one run; n seeds, the mean with its 95%
confidence interval, and the success rate against a target accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as sps


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1)
    ci_low: float
    ci_high: float
    min: float
    max: float

    @property
    def ci_half(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def summarize(values: list[float], confidence: float = 0.95) -> Summary:
    """Mean and the Student-t confidence interval of the mean (NaN half-width with one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return Summary(n, mean, std, mean - half, mean + half, min(values), max(values))


def success_rate(values: list[float], target: float) -> float:
    return sum(v >= target for v in values) / len(values)


@dataclass
class Comparison:
    diff: float  # mean(b) - mean(a)
    ci_low: float
    ci_high: float
    p_value: float
    df: float


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> Comparison:
    """Difference of means b - a with its Welch confidence interval and two-sided p-value."""
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    diff = sb.mean - sa.mean
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(diff, diff, diff, 0.0 if diff else 1.0, float("inf"))
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    half = sps.t.ppf((1 + confidence) / 2, df) * se
    p = 2 * sps.t.sf(abs(diff) / se, df)
    return Comparison(diff, diff - half, diff + half, p, df)


def verdict(acc: Comparison, time: Comparison | None, n: int) -> str:
    """Plain words for B against A: faster/slower (time), better/worse/no difference detected (accuracy)."""
    parts = []
    if time is not None:
        if time.ci_high < 0:
            parts.append(f"faster ({-time.diff:.3g} s less, 95% CI {-time.ci_high:.3g} to {-time.ci_low:.3g})")
        elif time.ci_low > 0:
            parts.append(f"slower ({time.diff:.3g} s more, 95% CI {time.ci_low:.3g} to {time.ci_high:.3g})")
        else:
            parts.append("no time difference detected")
    if acc.ci_low > 0:
        parts.append(f"more accurate (+{100 * acc.diff:.2f} pp, p={acc.p_value:.2g})")
    elif acc.ci_high < 0:
        parts.append(f"less accurate ({100 * acc.diff:.2f} pp, p={acc.p_value:.2g})")
    else:
        parts.append("no accuracy difference detected")
    return f"B vs A: {', '.join(parts)} at n={n}"
