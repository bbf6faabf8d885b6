"""The sequential CTR test: evidence, the always-valid bound, state across looks, false alarms
under repeated looks (dayloop.rollout.analysis.ctr)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as sps

from analysis_helpers import version_window as _window
from dayloop.rollout.analysis import (
    FAIL,
    PASS,
    CtrBatch,
    CtrState,
    Thresholds,
    analyse,
    ctr_log_evidence,
    ctr_ratio_upper_bound,
    naive_fixed_horizon_pvalue,
    update_ctr_state,
)


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
