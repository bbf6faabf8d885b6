"""The canary analysis as a pure function: each check's phase and numbers, the Prometheus
histogram_quantile rules, and the CTR test's error rate under repeated looks."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as sps

from dayloop.rollout.analysis import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    CtrBatch,
    CtrState,
    Histogram,
    Thresholds,
    VersionWindow,
    analyse,
    ctr_log_evidence,
    ctr_ratio_upper_bound,
    histogram_quantile,
    naive_fixed_horizon_pvalue,
    update_ctr_state,
    worst_phase,
)
from serving_helpers import LATENCY_LE, SCORE_LE  # the router's buckets, each closed by +Inf


def _histogram(bounds: tuple[float, ...], cdf, n: float) -> Histogram:
    """Expected cumulative counts of ``n`` observations with distribution ``cdf``."""
    cum = [n * float(cdf(b)) if math.isfinite(b) else n for b in bounds]
    return Histogram(bounds, tuple(cum))


def _latency(n: float, median_s: float = 0.0085, sigma: float = 0.35) -> Histogram:
    return _histogram(LATENCY_LE, sps.lognorm(s=sigma, scale=median_s).cdf, n)


def _scores(n: float, mean: float = 0.55, sd: float = 0.12) -> Histogram:
    return _histogram(SCORE_LE, sps.norm(mean, sd).cdf, n)


def _window(requests: float = 5000, error_ratio: float = 0.001, ctr: float = 0.3, **changes) -> VersionWindow:
    errors = requests * error_ratio
    impressions = requests - errors
    base = VersionWindow(requests=requests, errors=errors, nonfinite=0, impressions=impressions,
                         clicks=impressions * ctr, latency=_latency(requests), scores=_scores(impressions))
    return replace(base, **changes)


# --------------------------------------------------------------------------- phases


def test_worst_phase_order() -> None:
    assert worst_phase([PASS, PASS]) == PASS
    assert worst_phase([PASS, INCONCLUSIVE, PASS]) == INCONCLUSIVE
    assert worst_phase([INCONCLUSIVE, FAIL, PASS]) == FAIL
    assert worst_phase([]) == INCONCLUSIVE  # nothing checked is no evidence of health
    with pytest.raises(ValueError):
        worst_phase(["ok"])


def test_identical_windows_pass_every_check() -> None:
    w = _window()
    result = analyse(w, w, Thresholds())
    assert result.phase == PASS, result.reasons
    assert {c.name for c in result.checks} == {
        "nonfinite", "error_ratio", "latency_p99", "error_ratio_vs_control", "latency_p99_vs_control",
        "score_drift", "ctr"}
    assert all(c.phase == PASS for c in result.checks)
    assert result.reasons == []
    json.dumps(result.as_dict(), allow_nan=False)  # strict JSON for XCom


@pytest.mark.parametrize("requests", [1, 3, 10_000])
def test_nan_fails_at_any_sample_size(requests: float) -> None:
    canary = _window(requests=requests, nonfinite=1)
    result = analyse(canary, _window(), Thresholds())
    assert result.phase == FAIL
    check = result.check("nonfinite")
    assert check.phase == FAIL and "1 non-finite outputs > tolerance 0" in check.message


def test_nan_fails_even_with_every_other_series_missing() -> None:
    result = analyse(VersionWindow(nonfinite=2), VersionWindow(), Thresholds())
    assert result.phase == FAIL
    assert result.check("nonfinite").phase == FAIL
    assert all(c.phase == INCONCLUSIVE for c in result.checks if c.name != "nonfinite")


@pytest.mark.parametrize(("arm", "field_name"), [
    *(("canary", f) for f in ("requests", "errors", "nonfinite", "impressions", "clicks", "latency", "scores")),
    *(("control", f) for f in ("requests", "errors", "impressions", "clicks", "latency", "scores")),
])
def test_missing_series_is_inconclusive_never_pass(arm: str, field_name: str) -> None:
    good = _window()
    broken = replace(good, **{field_name: None})
    canary, control = (broken, good) if arm == "canary" else (good, broken)
    result = analyse(canary, control, Thresholds())
    assert any("series missing" in r for r in result.reasons), result.reasons
    if field_name == "scores":
        # Only the (advisory) score drift check reads the score histograms: it says why it
        # could not judge, and decides the phase only when made blocking.
        assert result.check("score_drift").phase == INCONCLUSIVE and result.check("score_drift").advisory
        assert result.phase == PASS
        assert analyse(canary, control, Thresholds(), advisory=()).phase == INCONCLUSIVE
    else:
        assert result.phase == INCONCLUSIVE


def test_score_drift_is_reported_but_only_decides_when_made_blocking() -> None:
    shifted = _window(scores=_scores(5000, mean=0.35))
    default = analyse(shifted, _window(), Thresholds())
    blocking = analyse(shifted, _window(), Thresholds(), advisory=())
    assert default.check("score_drift").phase == blocking.check("score_drift").phase == FAIL
    assert default.phase == PASS and blocking.phase == FAIL
    assert any(r.startswith("score_drift (advisory): score PSI") for r in default.reasons)
    assert default.as_dict()["checks"][-2]["advisory"] is True


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_invalid_counts_are_inconclusive(bad: float) -> None:
    result = analyse(_window(errors=bad), _window(), Thresholds())
    assert result.phase == INCONCLUSIVE
    assert result.check("error_ratio").phase == INCONCLUSIVE
    assert "invalid value" in result.check("error_ratio").message


def test_too_few_samples_is_inconclusive() -> None:
    t = Thresholds(min_requests=200, min_impressions=200)
    result = analyse(_window(requests=150), _window(), t)
    assert result.phase == INCONCLUSIVE
    for name in ("error_ratio", "latency_p99", "error_ratio_vs_control", "latency_p99_vs_control",
                 "score_drift", "ctr"):
        assert result.check(name).phase == INCONCLUSIVE, name
    assert "too few canary requests: 150 < 200" in result.check("error_ratio").message
    # a thin control arm is just as undecidable
    assert analyse(_window(), _window(requests=100), t).phase == INCONCLUSIVE


def test_no_traffic_at_all_is_inconclusive() -> None:
    empty = VersionWindow(requests=0, errors=0, nonfinite=0, impressions=0, clicks=0,
                          latency=Histogram(LATENCY_LE, (0.0,) * len(LATENCY_LE)),
                          scores=Histogram(SCORE_LE, (0.0,) * len(SCORE_LE)))
    assert analyse(empty, _window(), Thresholds()).phase == INCONCLUSIVE
    assert analyse(empty, empty, Thresholds()).phase == INCONCLUSIVE


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- latency


def test_histogram_quantile_follows_prometheus() -> None:
    h = Histogram((0.1, 0.2, 0.4, math.inf), (10, 50, 90, 100))
    # rank 45 lies in (0.1, 0.2] holding 40 observations, 35 of them below the rank
    assert histogram_quantile(0.45, h) == pytest.approx(0.1 + 0.1 * 35 / 40)
    # the first bucket starts at 0 when its bound is positive
    assert histogram_quantile(0.05, h) == pytest.approx(0.05)
    # a rank in the +Inf bucket answers the largest finite bound
    assert histogram_quantile(0.99, h) == pytest.approx(0.4)
    assert math.isnan(histogram_quantile(0.5, Histogram((0.1, 0.2), (5, 10))))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, Histogram((0.1, math.inf), (0, 0))))  # no observations
    assert histogram_quantile(1.5, h) == math.inf and histogram_quantile(-0.1, h) == -math.inf
    # a bucket below a non-positive bound answers its bound
    assert histogram_quantile(0.1, Histogram((-0.5, 0.5, math.inf), (20, 90, 100))) == -0.5
    # a rank equal to a cumulative count stops at the first bucket reaching it (count >= rank)
    flat = Histogram((0.1, 0.2, 0.4, math.inf), (50, 50, 100, 100))
    assert histogram_quantile(0.5, flat) == pytest.approx(0.1)
    # increase() can leave a bucket a hair below the previous one: repaired like Prometheus
    jitter = Histogram((0.1, 0.2, 0.4, math.inf), (10, 9.9, 90, 100))
    assert histogram_quantile(0.5, jitter) == pytest.approx(0.2 + 0.2 * 40 / 80)


def test_histogram_repair_is_the_shared_running_maximum() -> None:
    from dayloop.rollout.analysis.inputs import monotone_cumulative

    jitter = Histogram((0.1, 0.2, 0.4, math.inf), (10, 9.9, 90, 100))
    assert list(jitter.monotone()) == list(monotone_cumulative(jitter.cumulative)) == [10, 10, 90, 100]


def test_histogram_from_prometheus_pairs() -> None:
    h = Histogram.from_prometheus([("+Inf", 100), ("0.2", 50), ("0.1", 10), ("0.4", 90)])
    assert h.upper_bounds == (0.1, 0.2, 0.4, math.inf) and h.count == 100
    assert h.complete
    with pytest.raises(ValueError):
        Histogram((0.2, 0.1), (1, 2))
    with pytest.raises(ValueError):
        Histogram((0.1,), (1, 2))


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


# --------------------------------------------------------------------------- scores


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


def test_analysis_serialises_to_strict_json_with_unbounded_values() -> None:
    # a handful of clicks leaves the CTR bound infinite: None in JSON, "inf" in the message
    result = analyse(_window(requests=20, clicks=2), _window(requests=20, clicks=3), Thresholds())
    ctr = result.check("ctr")
    assert ctr.values["upper_bound"] == math.inf and "upper bound inf" in ctr.message
    doc = json.loads(json.dumps(result.as_dict(), allow_nan=False))
    ctr_doc = next(c for c in doc["checks"] if c["name"] == "ctr")
    assert ctr_doc["values"]["upper_bound"] is None
    assert CtrState.from_dict(doc["ctr_state"]) == result.ctr_state


# --------------------------------------------------------------------------- CTR


def test_ctr_clear_drop_fails_identical_passes() -> None:
    t = Thresholds()
    control = _window(requests=20_000)
    dropped = analyse(_window(requests=20_000, ctr=0.21), control, t)  # 30 % fewer clicks per list
    ctr = dropped.check("ctr")
    assert ctr.phase == FAIL and dropped.phase == FAIL
    assert ctr.values["p_value"] <= t.alpha and ctr.values["upper_bound"] < 1 - t.ctr_margin
    assert ctr.values["rate_ratio"] == pytest.approx(0.7)
    same = analyse(_window(requests=20_000), control, t).check("ctr")
    assert same.phase == PASS and same.values["p_value"] > t.alpha
    assert same.values["upper_bound"] > 1.0


def test_ctr_rejection_agrees_with_the_upper_bound() -> None:
    # the p-value and the bound come from the same mixture: reject <=> bound below the floor
    for canary_clicks in (1200, 1350, 1400, 1450, 1500):
        state = update_ctr_state(CtrState.start(Thresholds()), 0, 5000, canary_clicks, 5000, 1500)
        bound = ctr_ratio_upper_bound(state, 0.05)
        assert (state.p_value <= 0.05) == (bound < 0.98), (canary_clicks, state.p_value, bound)


def test_ctr_evidence_quadrature() -> None:
    # no data: the mixture of likelihood ratios is the mixing density's mass, 1
    assert ctr_log_evidence([], 0.02, 0.1) == 0.0
    assert ctr_log_evidence([CtrBatch("a", 100, 0, 100, 0)], 0.02, 0.1) == pytest.approx(0.0, abs=1e-5)
    # many clicks: agrees with the closed-form one-sided normal mixture on the log ratio
    x, y, e = 9000.0, 10000.0, 30000.0
    est, var, theta0, tau = math.log(x / y), 1 / x + 1 / y, math.log(0.98), 0.1
    d = est - theta0
    closed = (math.log(2 * math.sqrt(var / (var + tau**2))) + tau**2 * d**2 / (2 * var * (var + tau**2))
              + sps.norm.logcdf(-d * tau / math.sqrt(var * (var + tau**2))))
    assert ctr_log_evidence([CtrBatch("a", e, x, e, y)], 0.02, tau) == pytest.approx(closed, rel=0.01)


@pytest.mark.parametrize(("batches", "margin", "tau"), [
    ([(40, 10, 60, 20)], 0.02, 0.1),
    ([(150, 30, 150, 50), (300, 80, 100, 35)], 0.0, 0.3),
    ([(100, 0, 900, 270)], 0.02, 0.1),  # no canary click at all
    ([(5000, 1400, 5000, 1500), (20000, 6100, 5000, 1480)], 0.02, 0.05),
])
def test_ctr_evidence_matches_the_model_integrated_independently(batches, margin, tau) -> None:
    """The documented model, integrated by scipy's adaptive quadrature: conditional on the
    total clicks of a batch the canary's are Binomial(n, p), logit p = theta + log(Ec/Ek);
    evidence = integral over d < 0 of LR(theta0 + d : theta0) x half-normal(d; tau)."""
    from scipy import integrate
    from scipy.special import expit

    theta0 = math.log(1 - margin)

    def loglik(theta: float) -> float:
        total = 0.0
        for ei, xi, ki, yi in batches:
            p = expit(theta + math.log(ei / ki))
            total += sps.binom.logpmf(xi, xi + yi, p)
        return total

    base = loglik(theta0)

    def integrand(d: float) -> float:
        return math.exp(loglik(theta0 + d) - base) * 2 * sps.norm.pdf(d, scale=tau)

    expected, _ = integrate.quad(integrand, -12 * tau, 0.0, limit=200, epsabs=0, epsrel=1e-10)
    got = ctr_log_evidence([CtrBatch(str(i), *b) for i, b in enumerate(batches)], margin, tau)
    assert got == pytest.approx(math.log(expected), abs=1e-6)


def test_ctr_state_relooks_count_only_the_growth() -> None:
    t = Thresholds()
    state = CtrState.start(t)
    s1 = update_ctr_state(state, "step-1", 100, 30, 900, 270)
    s2 = update_ctr_state(s1, "step-1", 250, 70, 2250, 680)  # same step, window grew
    assert len(s2.batches) == 2
    assert s2.batches[1] == CtrBatch("step-1", 150, 40, 1350, 410)
    assert s2.totals() == (250, 70, 2250, 680)
    s3 = update_ctr_state(s2, "step-2", 500, 150, 1500, 450)  # next step: a new window
    assert s3.totals() == (750, 220, 3750, 1130) and s3.looks == 3
    assert s3.p_value <= s2.p_value <= s1.p_value  # a running minimum
    with pytest.raises(ValueError, match="later step"):
        update_ctr_state(s3, "step-1", 300, 90, 2700, 800)
    # extrapolation jitter: a window that shrank a hair adds nothing, not negative clicks
    s4 = update_ctr_state(s3, "step-2", 499.6, 149.8, 1500.2, 450)
    assert all(v >= 0 for b in s4.batches for v in (b.canary_impressions, b.canary_clicks))
    # JSON round trip (XCom)
    assert CtrState.from_dict(json.loads(json.dumps(s4.to_dict()))) == s4


def test_ctr_state_carried_by_analyse() -> None:
    t = Thresholds()
    first = analyse(_window(), _window(), t, None, step=1)
    assert first.ctr_state is not None and first.ctr_state.looks == 1
    second = analyse(_window(), _window(), t, first.ctr_state, step=2)
    assert second.ctr_state.looks == 2 and len(second.ctr_state.batches) == 2
    # settings may not change during a rollout
    with pytest.raises(ValueError, match="changed during the rollout"):
        analyse(_window(), _window(), replace(t, ctr_margin=0.05), second.ctr_state, step=3)
    # 100 % canary: no control arm, only absolute checks, state carried unchanged
    full = analyse(_window(), None, t, second.ctr_state, step=3)
    assert {c.name for c in full.checks} == {"nonfinite", "error_ratio", "latency_p99"}
    assert full.ctr_state == second.ctr_state and full.phase == PASS


def test_ctr_rejection_is_kept_when_later_data_recover() -> None:
    # the always-valid p-value is the running minimum: evidence that once crossed 1/alpha
    # stays a rejection even if later looks alone would not reject
    t = Thresholds()
    state = update_ctr_state(CtrState.start(t), 1, 5000, 1000, 5000, 1500)
    assert state.p_value <= t.alpha
    for step in range(2, 12):
        state = update_ctr_state(state, step, 50_000, 15_500, 50_000, 15_000)
    current = math.exp(-ctr_log_evidence(state.batches, t.ctr_margin, t.ctr_mixture_scale))
    assert current > t.alpha and state.p_value <= t.alpha


def test_ctr_earlier_rejection_survives_missing_series() -> None:
    t = Thresholds()
    failed = analyse(_window(requests=20_000, ctr=0.2), _window(requests=20_000), t, step=1)
    assert failed.check("ctr").phase == FAIL
    later = analyse(_window(clicks=None), _window(), t, failed.ctr_state, step=2)
    assert later.check("ctr").phase == FAIL and "rejected earlier" in later.check("ctr").message


def test_repeated_looks_keep_false_alarms_below_alpha_naive_z_does_not() -> None:
    # A/A at the null's boundary (margin 0, so identical rates ARE the worst case), 10 looks
    # of 500 lists per arm at 0.3 clicks per list, 2,000 rollouts.
    rng = np.random.default_rng(20240604)
    sims, looks, lists, ctr, alpha = 2000, 10, 500.0, 0.3, 0.05
    t = Thresholds(ctr_margin=0.0, alpha=alpha)
    clicks = rng.poisson(lists * ctr, size=(sims, looks, 2)).astype(float)
    msprt = naive = 0
    for sim in range(sims):
        state = CtrState.start(t)
        naive_hit = False
        for look in range(looks):
            state = update_ctr_state(state, None, lists, clicks[sim, look, 0], lists, clicks[sim, look, 1])
            ci, cc, ki, kc = state.totals()
            naive_hit = naive_hit or naive_fixed_horizon_pvalue(ci, cc, ki, kc, margin=0.0) <= alpha
        msprt += state.p_value <= alpha
        naive += naive_hit
    sigma = math.sqrt(alpha * (1 - alpha) / sims)
    assert msprt / sims < alpha + 3 * sigma, msprt / sims
    # the same data checked at every look with a fixed-horizon z-test: ~3-4x alpha
    assert naive / sims > alpha + 3 * sigma, naive / sims


# --------------------------------------------------------------------------- thresholds


def test_thresholds_from_mapping() -> None:
    t = Thresholds.from_mapping({"max_error_ratio": 0.02, "min_requests": 50})
    assert t.max_error_ratio == 0.02 and t.min_requests == 50 and t.alpha == Thresholds().alpha
    with pytest.raises(ValueError, match="unknown"):
        Thresholds.from_mapping({"max_eror_ratio": 0.02})
    with pytest.raises(ValueError):
        Thresholds(alpha=0.0)
    with pytest.raises(ValueError):
        Thresholds(ctr_dispersion=0.5)
    with pytest.raises(ValueError):
        Thresholds(ctr_margin=1.0)
    assert Thresholds.from_mapping(t.as_dict()) == t


# --------------------------------------------------------------------------- small windows

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
