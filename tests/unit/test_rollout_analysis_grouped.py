"""The user-level CTR test (bucket groups + pre-period baseline), judged by its error rates
under repeated looks on clustered, heterogeneous users, and by what it refuses to decide."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dayloop.rollout.analysis import GroupCtrState, GroupWindow, StepGroups, Thresholds, VersionWindow, analyse
from dayloop.rollout.analysis.ctr import CtrState, update_ctr_state
from dayloop.rollout.analysis.grouped import (
    GroupInputError,
    canary_groups,
    estimate,
    log_evidence,
    start_state,
    step_alphas,
    update,
    upper_bound,
    why_not_estimable,
)

N_GROUPS = 100
DEMO_STEPS = ([10, 50, 100], [30, 40, 35])


def _users(rng: np.random.Generator, n: int = 551) -> np.ndarray:
    """Per-user expected clicks per list shaped like the demo's real panel: about half the
    users earn only noise clicks, the rest a heavy-tailed amount (mean ~0.45, sd ~0.6)."""
    return np.where(rng.random(n) < 0.54, 0.02, rng.gamma(1.2, 0.75, n))


def _rollout(rng: np.random.Generator, per_user_lists: float, ratio: float = 1.0, looks: tuple[int, ...] = (6, 8),
             shares: tuple[int, ...] = (10, 50), pre_lists: float = 10.0, n_users: int = 551) -> tuple[bool, bool, list]:
    """One simulated rollout: users keep their group and their clickiness, ask
    ``per_user_lists`` times per look on average; the canary multiplies expected clicks by
    ``ratio``. Returns (group test rejected, impression test rejected, estimates)."""
    e = _users(rng, n_users)
    group = rng.integers(0, N_GROUPS, e.size)
    n0 = rng.poisson(pre_lists, e.size)
    c0 = rng.poisson(n0 * e)
    pre = GroupWindow.of(np.bincount(group, n0, N_GROUPS), np.bincount(group, c0, N_GROUPS))
    state = start_state(0.02, 0.05, 0.2, *DEMO_STEPS).with_baseline(pre, 300.0)
    naive = CtrState.start(Thresholds(ctr_margin=0.02, alpha=0.05, ctr_mixture_scale=0.2))
    naive_rejected = False
    estimates = []
    for step, (share, n_looks) in enumerate(zip(shares, looks, strict=True)):
        mask = canary_groups(share, N_GROUPS)
        on_canary = mask[group]
        n = np.zeros(e.size)
        c = np.zeros(e.size)
        for _ in range(n_looks):
            dn = rng.poisson(per_user_lists, e.size)
            n += dn
            c += rng.poisson(dn * e * np.where(on_canary, ratio, 1.0))
            post = GroupWindow.of(np.bincount(group, n, N_GROUPS), np.bincount(group, c, N_GROUPS))
            state, est, _ = update(state, step, post, mask, 40)
            estimates.append(est)
            naive = update_ctr_state(naive, step, n[on_canary].sum(), c[on_canary].sum(),
                                     n[~on_canary].sum(), c[~on_canary].sum())
            naive_rejected |= naive.p_value <= 0.05
            if state.rejected:
                return True, naive_rejected, estimates
    return False, naive_rejected, estimates


@pytest.mark.parametrize("per_user_lists", [0.2, 2.0, 6.0])
def test_an_identical_model_is_rarely_rolled_back_however_much_each_user_asks(per_user_lists):
    rng = np.random.default_rng(11)
    runs = [_rollout(rng, per_user_lists) for _ in range(150)]
    group_rate = np.mean([r[0] for r in runs])
    naive_rate = np.mean([r[1] for r in runs])
    # alpha 0.05 over the whole rollout; 150 runs: 0.05 + 2.5 sd of a binomial is ~0.095
    assert group_rate <= 0.095, group_rate
    if per_user_lists >= 2.0:
        # the impression-level test on the same users is fooled by which users the arms hold
        assert naive_rate > 0.15, naive_rate


def test_a_real_drop_is_detected_when_users_ask_often_enough():
    rng = np.random.default_rng(5)
    runs = [_rollout(rng, 6.0, ratio=0.7) for _ in range(40)]
    assert np.mean([r[0] for r in runs]) >= 0.9


def test_the_baseline_removes_most_of_the_variance_when_users_persist():
    rng = np.random.default_rng(3)
    _, _, estimates = _rollout(rng, 6.0, pre_lists=60.0, looks=(3, 3))
    last = [e for e in estimates if e is not None][-1]
    assert last.variance_removed > 0.6
    assert 0.6 < last.theta <= 1.5
    assert abs(last.log_ratio) < 4 * math.sqrt(last.variance)


def test_the_adjusted_estimate_is_centred_on_the_true_ratio():
    rng = np.random.default_rng(8)
    finals = []
    for _ in range(60):
        _, _, estimates = _rollout(rng, 4.0, ratio=0.9, looks=(1, 4), pre_lists=30.0)
        finals.append([e for e in estimates if e is not None][-1].log_ratio)
    assert abs(np.mean(finals) - math.log(0.9)) < 0.03


def _windows(pre_imp=50.0, post_imp=20.0, clicks=0.3):
    imp = np.full(N_GROUPS, post_imp)
    pre = GroupWindow.of(np.full(N_GROUPS, pre_imp), np.full(N_GROUPS, pre_imp * clicks))
    post = GroupWindow.of(imp, imp * clicks)
    return pre, post


def test_missing_groups_no_baseline_and_thin_data_are_inconclusive_never_healthy():
    pre, post = _windows()
    mask = canary_groups(10, N_GROUPS)
    holed = GroupWindow.of([None, *post.impressions[1:]], post.clicks)
    assert "missing" in why_not_estimable(pre, holed, mask, 40)
    pre_holed = GroupWindow.of(pre.impressions, [math.nan, *pre.clicks[1:]])
    assert "pre-period" in why_not_estimable(pre_holed, post, mask, 40)
    assert "too few impressions" in why_not_estimable(pre, post, mask, 1e6)
    no_pre_clicks = GroupWindow.of(pre.impressions, np.zeros(N_GROUPS))
    assert "no baseline" in why_not_estimable(no_pre_clicks, post, mask, 40)
    assert "no control" in why_not_estimable(pre, post, canary_groups(100, N_GROUPS), 40)
    state = start_state(0.02, 0.05, 0.2, *DEMO_STEPS)  # no baseline read
    state, est, why = update(state, 0, post, mask, 40)
    assert est is None and "no pre-period baseline" in why and not state.rejected


def test_the_check_is_inconclusive_then_passes_and_says_its_numbers():
    pre, post = _windows()
    mask = canary_groups(10, N_GROUPS)
    t = Thresholds(min_requests=10, min_impressions=40, ctr_margin=0.02, alpha=0.05)
    window = VersionWindow(requests=200, errors=0, nonfinite=0, impressions=200, clicks=60)
    state = start_state(0.02, 0.05, 0.2, *DEMO_STEPS)
    a = analyse(window, window, t, state, step=0, users=StepGroups(0, post, mask))
    assert a.check("ctr").phase == "inconclusive"
    a = analyse(window, window, t, state.with_baseline(pre, 120.0), step=0, users=StepGroups(0, post, mask))
    ctr = a.check("ctr")
    assert ctr.phase == "pass", ctr.message
    assert ctr.values["unit"] == "bucket group" and ctr.values["canary_groups"] == 10
    assert "baseline removed" in ctr.message and "upper bound" in ctr.message
    with pytest.raises(ValueError, match="GroupCtrState"):
        analyse(window, window, t, None, step=0, users=StepGroups(0, post, mask))
    with pytest.raises(ValueError, match="group counts"):
        analyse(window, window, t, state, step=0)


def test_a_collapsed_canary_fails_at_once_and_stays_failed():
    pre, post = _windows(post_imp=200.0)
    mask = canary_groups(50, N_GROUPS)
    clicks = post.clicks.copy()
    clicks[mask] *= 0.2
    state = start_state(0.02, 0.05, 0.2, *DEMO_STEPS).with_baseline(pre, 120.0)
    rng = np.random.default_rng(0)
    noisy = GroupWindow.of(post.impressions, rng.poisson(clicks).astype(float))
    state, est, _ = update(state, 1, noisy, mask, 40)
    assert state.rejected and est.ratio < 0.4 and state.p_value <= 0.05
    # a later look with missing data keeps the earlier rejection
    state2, est2, why = update(state, 1, GroupWindow.of([None] * N_GROUPS, noisy.clicks), mask, 40)
    assert est2 is None and state2.rejected


def test_state_round_trips_and_refuses_a_foreign_state():
    pre, post = _windows()
    state = start_state(0.02, 0.05, 0.2, *DEMO_STEPS).with_baseline(pre, 60.0)
    state, _, _ = update(state, 0, post, canary_groups(10, N_GROUPS), 40)
    back = GroupCtrState.from_dict(state.to_dict())
    assert back.to_dict() == state.to_dict()
    with pytest.raises(ValueError, match="not a user-level"):
        GroupCtrState.from_dict({"margin": 0.02})


def test_alpha_is_split_over_the_steps_with_control_and_sums_to_alpha():
    alphas = step_alphas([1, 5, 25, 50, 100], [3600, 3600, 7200, 7200, 3600], 0.05)
    assert alphas[-1] == 0.0 and all(a > 0 for a in alphas[:-1])
    assert math.isclose(sum(alphas), 0.05)
    assert alphas[3] > alphas[0]  # the 50% step carries the information
    assert step_alphas([100], [10], 0.05) == [0.0]


def test_evidence_grows_with_the_boundary_and_the_bound_is_where_it_reaches_one_over_alpha():
    d, v = math.log(0.95), 0.01**2
    evs = [log_evidence(d, v, b, 0.05) for b in np.linspace(d - 0.05, d + 0.1, 20)]
    assert all(b >= a for a, b in zip(evs, evs[1:], strict=False))
    ub = upper_bound(d, v, 0.05, 0.05)
    assert ub > d
    assert math.isclose(log_evidence(d, v, ub, 0.05), math.log(20), rel_tol=1e-5)


def test_partial_groups_and_mismatched_shapes_are_misuse():
    with pytest.raises(GroupInputError):
        canary_groups(2.5, N_GROUPS)
    pre, post = _windows()
    with pytest.raises(GroupInputError):
        why_not_estimable(pre, GroupWindow.of([1.0, 2.0], [0.0, 1.0]), canary_groups(10, N_GROUPS), 1)
    with pytest.raises(GroupInputError):
        GroupWindow.of([1.0], [1.0])
    est = estimate(pre, post, canary_groups(10, N_GROUPS))
    assert math.isclose(est.ratio, 1.0, rel_tol=1e-6)
