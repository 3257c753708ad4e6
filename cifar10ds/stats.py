"""Statistics for many-seed experiments: mean, std, Student-t confidence intervals, Welch's test.

The way the airbench-style report judges a change: never one run; n seeds, the mean with its 95%
confidence interval, and the success rate against a target accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% Student-t critical values t(0.975, df) for df 1..30, for machines without scipy (the GPU
# benchmark machine has none); beyond 30 they are interpolated in 1/df towards the normal's 1.95996.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t_ppf(q: float, df: float) -> float:
    """The Student-t quantile: scipy's where installed, else (q = 0.975 only) the table above."""
    try:
        from scipy import stats as sps
    except ImportError:
        if q != 0.975:
            raise
        if df <= 30 and df == int(df):
            return _T975[int(df) - 1]
        return 1.95996 + (_T975[29] - 1.95996) * 30 / df
    return float(sps.t.ppf(q, df))


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
    half = t_ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
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
    from scipy import stats as sps

    half = t_ppf((1 + confidence) / 2, df) * se
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
