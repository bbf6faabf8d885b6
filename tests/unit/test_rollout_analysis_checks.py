"""The guardrail checks: error ratio, p99 latency, score drift (dayloop.rollout.analysis.checks)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as sps

from analysis_helpers import latency_histogram as _latency
from analysis_helpers import score_histogram as _scores
from analysis_helpers import version_window as _window
from dayloop.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Histogram,
    Thresholds,
    analyse,
)
from serving_helpers import LATENCY_LE, SCORE_LE  # the router's buckets, each closed by +Inf


def test_error_ratio_over_budget_fails_with_numbers() -> None:
    canary = _window(requests=1000, errors=31)
    result = analyse(canary, _window(), Thresholds(max_error_ratio=0.01))
    check = result.check("error_ratio")
    assert check.phase == FAIL
    assert "error ratio 0.031 > max 0.010" in check.message
    assert check.values["ratio"] == pytest.approx(0.031)
    assert result.phase == FAIL
    assert any(r.startswith("error_ratio: error ratio 0.031") for r in result.reasons)


def test_error_ratio_vs_control_uses_a_lower_bound() -> None:
    t = Thresholds(max_error_ratio=0.05, max_error_ratio_vs_control=0.005)
    # 0.8 % vs 0.1 % on 20,000 requests: under the absolute budget, clearly above control
    result = analyse(_window(requests=20_000, error_ratio=0.008), _window(requests=20_000), t)
    assert result.check("error_ratio").phase == PASS
    vs = result.check("error_ratio_vs_control")
    assert vs.phase == FAIL and vs.values["canary_lower_bound"] > 0.006
    # 2 errors in 200 requests (1 %) vs 0.1 %: the point excess 0.9 % is noise at this size
    noisy = analyse(_window(requests=200, errors=2), _window(requests=20_000), t)
    assert noisy.check("error_ratio_vs_control").phase == PASS


def test_wilson_lower_bound_matches_scipy_on_whole_counts() -> None:
    # scipy's Wilson interval takes integers only; ours also takes increase()'s fractions.
    from dayloop.rollout.analysis.checks import _wilson_lower

    for n in (1, 10, 200, 20_000):
        for k in sorted({0, 1, n // 3, n}):
            for alpha in (0.001, 0.05, 0.2):
                ci = sps.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="wilson")
                assert _wilson_lower(k, n, alpha) == pytest.approx(ci.low, abs=1e-12)
    assert 0 < _wilson_lower(2.5, 200.4, 0.05) < 2.5 / 200.4


def test_p99_over_budget_fails() -> None:
    slow = _window(latency=_latency(5000, median_s=0.12))  # p99 ~ 0.27 s
    result = analyse(slow, _window(), Thresholds(p99_budget_s=0.25))
    check = result.check("latency_p99")
    assert check.phase == FAIL
    assert check.values["p99_s"] > 0.25
    assert "> budget 250.0 ms" in check.message


def test_p99_above_top_bucket_fails_when_budget_is_below_it() -> None:
    stuck = _window(latency=Histogram(LATENCY_LE, (0.0,) * (len(LATENCY_LE) - 1) + (5000.0,)))
    check = analyse(stuck, _window(), Thresholds(p99_budget_s=0.25)).check("latency_p99")
    assert check.phase == FAIL and check.values["above_top_bucket"] is True
    assert ">= 2000.0 ms (above the top bucket)" in check.message


def test_p99_vs_control_fails_within_budget() -> None:
    t = Thresholds(p99_budget_s=0.25, max_p99_ratio_vs_control=1.5, p99_slack_s=0.005)
    canary = _window(latency=_latency(5000, median_s=0.020))  # p99 ~ 45 ms
    result = analyse(canary, _window(), t)  # control p99 ~ 19 ms
    assert result.check("latency_p99").phase == PASS
    check = result.check("latency_p99_vs_control")
    assert check.phase == FAIL
    assert check.values["canary_p99_s"] > check.values["limit_s"]
    assert "limit 1.5 x control + 5.0 ms" in check.message
    # the same canary passes when control is as slow
    assert analyse(canary, canary, t).check("latency_p99_vs_control").phase == PASS


def test_score_drift_detected_for_a_shifted_histogram() -> None:
    shifted = _window(scores=_scores(5000, mean=0.35))
    check = analyse(shifted, _window(), Thresholds()).check("score_drift")
    assert check.phase == FAIL
    assert check.values["psi"] > 0.25 and check.values["p_value"] < 1e-6
    assert "score PSI" in check.message and "> max 0.25" in check.message
    # a small shift stays under the PSI limit
    assert analyse(_window(scores=_scores(5000, mean=0.56)), _window(), Thresholds()).check(
        "score_drift").phase == PASS


def test_score_drift_on_small_counts_needs_significance() -> None:
    rng = np.random.default_rng(3)
    control = _window(requests=20_000)
    probs = np.diff(np.asarray(_scores(1.0).cumulative), prepend=0.0)
    # two unlucky canary samples of 210 lists from control's own distribution: PSI can
    # look large, the chi-square test does not call it a drift
    fails = 0
    for _ in range(200):
        counts = rng.multinomial(210, probs / probs.sum())
        canary = _window(requests=210, scores=Histogram(SCORE_LE, tuple(np.cumsum(counts).astype(float))))
        fails += analyse(canary, control, Thresholds()).check("score_drift").phase == FAIL
    assert fails <= 2


def test_large_psi_on_few_lists_is_inconclusive_not_fail() -> None:
    t = Thresholds(min_impressions=20)
    canary = _window(scores=_scores(25, mean=0.45))  # a real shift, seen on 25 lists only
    check = analyse(canary, _window(requests=20_000), t).check("score_drift")
    assert check.values["psi"] > t.max_score_drift and check.values["p_value"] > t.drift_alpha
    assert check.phase == INCONCLUSIVE and "not significant" in check.message
    # the same shift on 5,000 lists is a drift
    assert analyse(_window(scores=_scores(5000, mean=0.45)), _window(requests=20_000), t).check(
        "score_drift").phase == FAIL


def test_score_buckets_must_match() -> None:
    other = Histogram(tuple(b for b in SCORE_LE if b != 0.0), tuple(1000.0 * i for i in range(len(SCORE_LE) - 1)))
    check = analyse(_window(scores=other), _window(), Thresholds()).check("score_drift")
    assert check.phase == INCONCLUSIVE and "buckets differ" in check.message


_LE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, math.inf)


def _counts(*per_bucket: float) -> Histogram:
    return Histogram(_LE, tuple(np.cumsum(per_bucket)))


def test_count_above_interpolates_inside_the_bucket() -> None:
    from dayloop.rollout.analysis.checks import _count_above

    h = _counts(10, 10, 10, 10, 0, 0, 0)  # 40 observations up to 50 ms
    assert _count_above(h, 0.05) == pytest.approx(0.0)
    assert _count_above(h, 0.0375) == pytest.approx(5.0)  # half of the 25-50 ms bucket
    assert _count_above(h, 0.001) == pytest.approx(40 - 10 * 0.2)
    assert _count_above(_counts(10, 0, 0, 0, 0, 0, 3), 0.3) == pytest.approx(3.0)  # past the top bound


def test_one_slow_request_in_a_small_window_is_not_a_latency_breach() -> None:
    """With 40 canary requests the p99 is their maximum: one slow request must not fail it."""
    t = Thresholds(min_requests=40, min_impressions=20, p99_budget_s=0.2)
    control = _window(requests=400)
    one_slow = replace(_window(requests=40), latency=_counts(30, 9, 0, 0, 0, 1, 0))  # one at 100-250 ms
    result = analyse(one_slow, control, t)
    assert result.check("latency_p99").phase != FAIL
    assert result.check("latency_p99_vs_control").phase == INCONCLUSIVE
    assert "not yet significant" in result.check("latency_p99_vs_control").message
    all_slow = replace(_window(requests=40), latency=_counts(0, 0, 0, 0, 0, 40, 0))
    slow = analyse(all_slow, control, t)
    assert slow.check("latency_p99").phase == FAIL and slow.check("latency_p99_vs_control").phase == FAIL
    assert slow.check("latency_p99_vs_control").values["p_value"] < 1e-10
