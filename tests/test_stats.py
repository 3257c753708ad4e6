import math

import pytest
from scipy import stats as sps

from cifar10ds.stats import success_rate, summarize, verdict, welch


def test_summary_against_hand_checked_values():
    # 1, 2, 3, 4, 5: mean 3, sample std sqrt(2.5); t(0.975, 4) = 2.776445 (printed t-tables: 2.776)
    s = summarize([1, 2, 3, 4, 5])
    assert (s.n, s.mean, s.min, s.max) == (5, 3, 1, 5)
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.ci_half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((3 - s.ci_half, 3 + s.ci_half))


def test_summary_of_one_value_has_no_interval():
    s = summarize([0.9])
    assert s.mean == 0.9 and math.isnan(s.std) and math.isnan(s.ci_half)


def test_success_rate():
    assert success_rate([0.93, 0.94, 0.95, 0.941], 0.94) == 0.75


def test_welch_matches_scipy():
    a = [0.931, 0.935, 0.94, 0.928, 0.933, 0.937]
    b = [0.941, 0.945, 0.939, 0.95, 0.944]
    c = welch(a, b)
    ref = sps.ttest_ind(b, a, equal_var=False)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert c.diff == pytest.approx(sum(b) / 5 - sum(a) / 6)


def test_verdict_in_plain_words():
    acc = welch([0.94, 0.941, 0.939, 0.940], [0.9405, 0.9395, 0.9401, 0.9399])
    time = welch([10.0, 10.2, 9.9, 10.1], [8.0, 8.1, 7.9, 8.05])
    assert verdict(acc, time, 4).startswith("B vs A: faster (2.04 s less")
    assert verdict(acc, time, 4).endswith("no accuracy difference detected at n=4")
    better = welch([0.90, 0.91, 0.905], [0.95, 0.951, 0.949])
    assert "more accurate (+4.50 pp" in verdict(better, None, 3)


def test_t_table_without_scipy_matches_scipy(monkeypatch):
    import builtins

    from cifar10ds.stats import t_ppf

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    for df in (1, 2, 9, 24, 30):
        assert t_ppf(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), abs=1e-4)
    for df in (40, 99, 999, 1e6):  # interpolated: within 0.002 of the exact value
        assert t_ppf(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), abs=2e-3)
    with pytest.raises(ImportError):
        t_ppf(0.95, 5)
