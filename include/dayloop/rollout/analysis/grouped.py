"""The CTR check at the unit users are randomised by: bucket groups, with a pre-period baseline.

Why not impressions. The router assigns users (by bucket), each user asks many times, and
users differ hugely in how much they click (on the demo's real panel the champion's lists
earn 0.45 expected clicks per list, standard deviation 0.63 across users). Clicks per
impression are then not independent: a test that treats them so sees the luck of which users
landed in the canary as evidence, and rolls back more healthy models the more each user asks
(measured A/A, the champion against itself: 4% false rollbacks at the demo's traffic, 32-41%
at 10-30x as many requests per user). The unit of analysis here is the bucket group
(:data:`serving.routing.N_GROUPS` contiguous bucket ranges under the rollout's salt; a step of
a whole percent owns whole groups), and the variance is taken over groups.

The pre-period baseline (CUPED; Deng, Xu, Kohavi, Walker 2013). The rollout keeps the salt the
champion-only table already had, so before the canary got users its future groups were being
served by the champion: each group's clicks and impressions in that period say how clicky its
users are. The estimate is the change in the canary's groups against the change in control's,

    D = log(Y_canary / Y_control) - theta * log(X_canary / X_control)

with Y an arm's clicks per impression in the step's window and X the same groups' clicks per
impression in the pre-period. The arms are random, so the pre-period term has mean zero and D
estimates the log CTR ratio for any theta; the theta that minimises D's variance (the
regression of post on pre, group by group, by the delta method for ratio metrics: Deng et al.
2018, "Applying the Delta Method in Metric Analytics") removes what the groups' users share
between the two periods. The per-group moments are pooled over both arms (groups are
exchangeable before treatment), so a 1 % step owning one group still has a variance.

Repeated looks. Within a step the estimates nest (each look adds data to the same groups), so
(D, Var D) follows the canonical joint distribution of sequential estimates and a one-sided
normal-mixture likelihood ratio on it is a test supermartingale in the large-sample limit
(Johari, Pekelis and Walsh's mSPRT; the asymptotic confidence sequences of Waudby-Smith et al.
use the same mixture). Its half-normal mixture has the closed form of :func:`log_evidence`.
Across steps the groups change arms, and one group's lasting habits enter several steps'
estimates, so steps are not independent: each step spends its own share of alpha
(:func:`step_alphas`, a Bonferroni split, valid under any dependence), weighted towards the
steps that carry the information.

Inconclusive, never healthy: a group whose series is missing, too few impressions in either
arm in the step or in the pre-period, no clicks at all in an arm's pre-period.

Pure: numpy, and scipy inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

# Least number of active groups (both arms together) the pooled variance is taken over: two
# arm means are fitted, so fewer leaves no honest degrees of freedom.
MIN_GROUPS = 6
# theta is a regression slope estimated from the same groups; a wild value from a handful of
# groups would add more noise than it removes, so it is kept in [0, 1.5] (measured on the
# demo's panel: 0.9-1.0 with a few minutes of pre-period).
THETA_RANGE = (0.0, 1.5)
# An arm with no clicks at all is read as half a click: a canary that earns nothing keeps a
# finite (strongly negative) log ratio. Any click count above zero is used as it is.
_ZERO_CLICKS = 0.5
# Share of alpha every step with a control arm gets before the rest is split by information.
_ALPHA_FLOOR_SHARE = 0.2


class GroupInputError(ValueError):
    """Group counts that cannot be judged at all (wrong shapes): a misuse, not missing data."""


@dataclass(frozen=True)
class GroupWindow:
    """Impressions and clicks per bucket group over one window (NaN: the series is missing)."""

    impressions: np.ndarray
    clicks: np.ndarray

    @classmethod
    def of(cls, impressions: Sequence[float | None], clicks: Sequence[float | None]) -> GroupWindow:
        imp = np.array([math.nan if v is None else float(v) for v in impressions], dtype=np.float64)
        clk = np.array([math.nan if v is None else float(v) for v in clicks], dtype=np.float64)
        if imp.ndim != 1 or imp.shape != clk.shape or imp.size < 2:
            raise GroupInputError(f"group counts need two equal-length vectors, got {imp.shape} and {clk.shape}")
        return cls(imp, clk)

    @property
    def n_groups(self) -> int:
        return int(self.impressions.size)

    def missing(self) -> list[int]:
        """Groups whose impressions or clicks are missing or invalid (NaN, inf, negative)."""
        bad = ~(np.isfinite(self.impressions) & np.isfinite(self.clicks)
                & (self.impressions >= 0) & (self.clicks >= 0))
        return [int(g) for g in np.flatnonzero(bad)]

    def to_dict(self) -> dict[str, list[float | None]]:
        def plain(a: np.ndarray) -> list[float | None]:
            return [None if not math.isfinite(v) else float(v) for v in a]
        return {"impressions": plain(self.impressions), "clicks": plain(self.clicks)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> GroupWindow:
        return cls.of(doc["impressions"], doc["clicks"])


def canary_groups(percent: float, n_groups: int) -> np.ndarray:
    """Boolean mask of the groups a canary at ``percent`` owns (its range starts at bucket 0)."""
    owned = percent * n_groups / 100.0
    if abs(owned - round(owned)) > 1e-9:
        raise GroupInputError(f"a canary at {percent:g}% does not own whole groups ({n_groups} groups)")
    mask = np.zeros(n_groups, dtype=bool)
    mask[: int(round(owned))] = True
    return mask


@dataclass(frozen=True)
class StepGroups:
    """What one look of the user-level test needs beyond the state: the step's index, its
    window's per-group counts since the step began, and which groups the canary owns."""

    step: int
    post: GroupWindow
    canary: np.ndarray


@dataclass(frozen=True)
class GroupEstimate:
    """The baseline-adjusted log CTR ratio canary/control of one look, with its parts."""

    log_ratio: float          # D, adjusted
    variance: float           # Var(D), over groups
    raw_log_ratio: float      # without the baseline
    raw_variance: float
    theta: float
    canary_groups: int        # active groups (with any traffic) per arm
    control_groups: int
    canary_impressions: float
    canary_clicks: float
    control_impressions: float
    control_clicks: float
    baseline_canary_ctr: float
    baseline_control_ctr: float

    @property
    def ratio(self) -> float:
        return math.exp(self.log_ratio)

    @property
    def raw_ratio(self) -> float:
        return math.exp(self.raw_log_ratio)

    @property
    def variance_removed(self) -> float:
        """Share of the unadjusted estimate's variance the baseline removed."""
        return 1.0 - self.variance / self.raw_variance if self.raw_variance > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"adjusted_ratio": self.ratio, "raw_ratio": self.raw_ratio, "log_ratio": self.log_ratio,
                "se": math.sqrt(self.variance), "raw_se": math.sqrt(self.raw_variance), "theta": self.theta,
                "variance_removed": self.variance_removed, "canary_groups": self.canary_groups,
                "control_groups": self.control_groups, "canary_impressions": self.canary_impressions,
                "canary_clicks": self.canary_clicks, "control_impressions": self.control_impressions,
                "control_clicks": self.control_clicks, "baseline_canary_ctr": self.baseline_canary_ctr,
                "baseline_control_ctr": self.baseline_control_ctr}


def _arm_sums(w: GroupWindow, mask: np.ndarray) -> tuple[float, float]:
    return float(w.impressions[mask].sum()), float(w.clicks[mask].sum())


def why_not_estimable(pre: GroupWindow, post: GroupWindow, canary: np.ndarray,
                      min_impressions: float) -> str | None:
    """Why this look cannot be judged (inconclusive), or None when it can."""
    if not (pre.n_groups == post.n_groups == canary.size):
        raise GroupInputError(f"pre ({pre.n_groups}), post ({post.n_groups}) and the canary mask "
                              f"({canary.size}) must cover the same groups")
    if not canary.any() or canary.all():
        return "the step has no control groups or no canary groups"
    for what, w in (("step window", post), ("pre-period", pre)):
        missing = w.missing()
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            return f"{len(missing)} group series missing or invalid in the {what} (groups {shown})"
    for what, w in (("step window", post), ("pre-period", pre)):
        for arm, mask in (("canary", canary), ("control", ~canary)):
            n, _ = _arm_sums(w, mask)
            if n < min_impressions:
                return (f"too few impressions in the {what} for the {arm} groups: {n:g} "
                        f"(min {min_impressions:g})")
    for arm, mask in (("canary", canary), ("control", ~canary)):
        if _arm_sums(pre, mask)[1] <= 0:
            return f"no clicks in the pre-period for the {arm} groups: no baseline"
    if _arm_sums(post, ~canary)[1] <= 0:
        return "no control clicks in the step window"
    active = (post.impressions > 0) | (pre.impressions > 0)
    if int(active.sum()) < MIN_GROUPS:
        return f"only {int(active.sum())} groups with traffic (min {MIN_GROUPS})"
    return None


def estimate(pre: GroupWindow, post: GroupWindow, canary: np.ndarray) -> GroupEstimate:
    """The baseline-adjusted estimate (call :func:`why_not_estimable` first).

    Linearised per group, relative to the group's arm: ``rho_g = c_g / Y_a - n_g`` (post
    clicks in units of the arm's rate, minus impressions) and ``pi_g = c0_g / X_a - n0_g``
    (the same in the pre-period); log Y_a moves by ``sum rho_g / N_a`` and log X_a by
    ``sum pi_g / N0_a``. Their moments are pooled over all active groups, M - 2 degrees of
    freedom for the two arms' fitted rates: on the relative scale a canary that changes
    every user's clicks by the same factor leaves them comparable, and a one-group step
    still has a variance."""
    active = (post.impressions > 0) | (pre.impressions > 0)
    sums = {}
    for arm, mask in (("c", canary & active), ("k", ~canary & active)):
        n, c = _arm_sums(post, mask)
        n0, c0 = _arm_sums(pre, mask)
        sums[arm] = (mask, n, c if c > 0 else _ZERO_CLICKS, n0, c0 if c0 > 0 else _ZERO_CLICKS)
    rho = np.zeros(post.n_groups)
    pi = np.zeros(post.n_groups)
    for mask, n, c, n0, c0 in sums.values():
        rho[mask] = post.clicks[mask] * (n / c) - post.impressions[mask]
        pi[mask] = pre.clicks[mask] * (n0 / c0) - pre.impressions[mask]
    rho, pi = rho[active], pi[active]
    dof = max(rho.size - 2, 1)
    v_rho, v_pi, c_rp = float(rho @ rho) / dof, float(pi @ pi) / dof, float(rho @ pi) / dof
    m = {arm: float(v[0].sum()) for arm, v in sums.items()}
    a = v_rho * sum(m[k] / sums[k][1] ** 2 for k in m)
    b = c_rp * sum(m[k] / (sums[k][1] * sums[k][3]) for k in m)
    cc = v_pi * sum(m[k] / sums[k][3] ** 2 for k in m)
    theta = min(max(b / cc, THETA_RANGE[0]), THETA_RANGE[1]) if cc > 0 else 0.0
    mask_c, nc, cc_, n0c, c0c = sums["c"]
    mask_k, nk, ck, n0k, c0k = sums["k"]
    raw = math.log((cc_ / nc) / (ck / nk))
    pre_gap = math.log((c0c / n0c) / (c0k / n0k))
    var = max(a - 2 * theta * b + theta**2 * cc, 1e-12)
    return GroupEstimate(log_ratio=raw - theta * pre_gap, variance=var, raw_log_ratio=raw,
                         raw_variance=max(a, 1e-12), theta=theta, canary_groups=int(m["c"]),
                         control_groups=int(m["k"]), canary_impressions=nc,
                         canary_clicks=_arm_sums(post, mask_c)[1], control_impressions=nk,
                         control_clicks=_arm_sums(post, mask_k)[1], baseline_canary_ctr=c0c / n0c,
                         baseline_control_ctr=c0k / n0k)


def log_evidence(log_ratio: float, variance: float, boundary: float, mixture_scale: float) -> float:
    """log of the one-sided mixture likelihood ratio that the true log ratio is below
    ``boundary``, for an estimate ``log_ratio`` with ``variance``.

    Gaussian limit: the estimate is N(delta, V); alternatives ``boundary - |N(0, tau^2)|``.
    With information I = 1/V, score S = (boundary - D) I and a = I + 1/tau^2 the mixture is
    ``2 / sqrt(1 + tau^2 I) * exp(S^2 / 2a) * Phi(S / sqrt(a))`` (the half-normal integral in
    closed form), a supermartingale under every true ratio at or above the boundary."""
    from scipy.special import log_ndtr

    info = 1.0 / variance
    tau2 = mixture_scale**2
    s = (boundary - log_ratio) * info
    a = info + 1.0 / tau2
    return float(math.log(2.0) - 0.5 * math.log1p(tau2 * info) + s * s / (2.0 * a) + log_ndtr(s / math.sqrt(a)))


def upper_bound(log_ratio: float, variance: float, alpha: float, mixture_scale: float) -> float:
    """The largest log ratio the mixture test does not reject at ``alpha``: an always-valid
    one-sided upper confidence bound (log scale). The evidence grows with the boundary."""
    from scipy.optimize import brentq

    target = math.log(1.0 / alpha)
    sd = math.sqrt(variance)

    def gap(b: float) -> float:
        return log_evidence(log_ratio, variance, b, mixture_scale) - target

    hi = log_ratio + sd
    while gap(hi) < 0:
        hi += 2.0 * (hi - log_ratio)
        if hi - log_ratio > 1e3:
            return math.inf
    return float(brentq(gap, log_ratio, hi, xtol=1e-7))


def step_alphas(percents: Sequence[float], bakes: Sequence[float], alpha: float) -> list[float]:
    """Each step's share of the rollout's alpha (0 for a step without control).

    Bonferroni across steps (the steps' estimates share groups, so they are dependent and
    only a union bound is safe). Every step with a control arm gets a floor
    (``_ALPHA_FLOOR_SHARE`` split evenly) so an early step can still stop a gross drop; the
    rest goes by the information a step is planned to carry, ``p (1 - p) x bake`` for a
    canary share p."""
    tested = [0 < p < 100 for p in percents]
    k = sum(tested)
    if k == 0:
        return [0.0] * len(percents)
    info = [(p / 100) * (1 - p / 100) * b if t else 0.0 for p, b, t in zip(percents, bakes, tested, strict=True)]
    total = sum(info)
    return [alpha * (_ALPHA_FLOOR_SHARE / k + (1 - _ALPHA_FLOOR_SHARE) * i / total) if t else 0.0
            for i, t in zip(info, tested, strict=True)]


@dataclass(frozen=True)
class StepEvidence:
    """One step's sequential record: its alpha, the most evidence any look reached, the
    lowest upper bound, and the latest estimate (as a dict)."""

    alpha: float
    max_log_evidence: float = -math.inf
    min_upper_log: float = math.inf
    looks: int = 0
    last: Mapping[str, float] | None = None

    @property
    def rejected(self) -> bool:
        return self.max_log_evidence >= math.log(1.0 / self.alpha)

    @property
    def p_value(self) -> float:
        return 1.0 if self.max_log_evidence <= 0 else math.exp(-self.max_log_evidence)


@dataclass(frozen=True)
class GroupCtrState:
    """The user-level CTR test's memory across the looks of one rollout (immutable; XCom-able).

    Settings are frozen at the start (changing them mid-rollout would void the guarantee).
    ``baseline`` is the pre-period's per-group counts, read once; ``steps`` maps a step index
    to its :class:`StepEvidence`."""

    margin: float
    alpha: float
    mixture_scale: float
    step_alpha: tuple[float, ...]
    baseline: GroupWindow | None = None
    baseline_seconds: float | None = None
    steps: Mapping[str, StepEvidence] = field(default_factory=dict)
    looks: int = 0

    unit = "group"

    @property
    def p_value(self) -> float:
        """The rollout's p-value for 'worse than the margin': each step's always-valid p-value
        scaled by its share of alpha, the smallest of them (<= alpha means rejected)."""
        ps = [min(1.0, s.p_value * self.alpha / s.alpha) for s in self.steps.values() if s.alpha > 0]
        return min(ps, default=1.0)

    @property
    def rejected(self) -> bool:
        return any(s.rejected for s in self.steps.values())

    def with_baseline(self, baseline: GroupWindow, seconds: float) -> GroupCtrState:
        return replace(self, baseline=baseline, baseline_seconds=float(seconds))

    def to_dict(self) -> dict[str, Any]:
        def step(s: StepEvidence) -> dict[str, Any]:
            return {"alpha": s.alpha, "looks": s.looks, "last": dict(s.last) if s.last else None,
                    "max_log_evidence": s.max_log_evidence if math.isfinite(s.max_log_evidence) else None,
                    "min_upper_log": s.min_upper_log if math.isfinite(s.min_upper_log) else None}
        return {"unit": self.unit, "margin": self.margin, "alpha": self.alpha, "mixture_scale": self.mixture_scale,
                "step_alpha": list(self.step_alpha), "looks": self.looks,
                "baseline": self.baseline.to_dict() if self.baseline is not None else None,
                "baseline_seconds": self.baseline_seconds,
                "steps": {k: step(v) for k, v in self.steps.items()}}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> GroupCtrState:
        if doc.get("unit") != cls.unit:
            raise ValueError(f"not a user-level CTR state: unit {doc.get('unit')!r}")

        def step(d: Mapping[str, Any]) -> StepEvidence:
            mle, mul = d.get("max_log_evidence"), d.get("min_upper_log")
            return StepEvidence(alpha=float(d["alpha"]), looks=int(d.get("looks", 0)), last=d.get("last"),
                                max_log_evidence=-math.inf if mle is None else float(mle),
                                min_upper_log=math.inf if mul is None else float(mul))
        base = doc.get("baseline")
        return cls(margin=float(doc["margin"]), alpha=float(doc["alpha"]), mixture_scale=float(doc["mixture_scale"]),
                   step_alpha=tuple(float(a) for a in doc["step_alpha"]),
                   baseline=GroupWindow.from_dict(base) if base else None,
                   baseline_seconds=None if doc.get("baseline_seconds") is None else float(doc["baseline_seconds"]),
                   steps={str(k): step(v) for k, v in (doc.get("steps") or {}).items()},
                   looks=int(doc.get("looks", 0)))


def start_state(margin: float, alpha: float, mixture_scale: float, percents: Sequence[float],
                bakes: Sequence[float]) -> GroupCtrState:
    """A fresh state for a rollout with these steps (percents and bake seconds, in order)."""
    if not 0 < margin < 1 or not 0 < alpha < 1 or not mixture_scale > 0:
        raise ValueError(f"invalid CTR test settings: margin {margin}, alpha {alpha}, scale {mixture_scale}")
    return GroupCtrState(margin=margin, alpha=alpha, mixture_scale=mixture_scale,
                         step_alpha=tuple(step_alphas(percents, bakes, alpha)))


def update(state: GroupCtrState, step: int, post: GroupWindow, canary: np.ndarray,
           min_impressions: float) -> tuple[GroupCtrState, GroupEstimate | None, str | None]:
    """One more look at ``step`` (its window's counts since the step began): the new state,
    the estimate (None when inconclusive) and why it is inconclusive (None when judged)."""
    if state.baseline is None:
        return replace(state, looks=state.looks + 1), None, "no pre-period baseline for this rollout"
    if not 0 <= step < len(state.step_alpha) or state.step_alpha[step] <= 0:
        raise GroupInputError(f"step {step} has no share of alpha (a step without control is not tested)")
    why = why_not_estimable(state.baseline, post, canary, min_impressions)
    key = str(step)
    prev = state.steps.get(key) or StepEvidence(alpha=state.step_alpha[step])
    if why is not None:
        steps = {**state.steps, key: replace(prev, looks=prev.looks + 1)}
        return replace(state, steps=steps, looks=state.looks + 1), None, why
    est = estimate(state.baseline, post, canary)
    boundary = math.log(1.0 - state.margin)
    ev = log_evidence(est.log_ratio, est.variance, boundary, state.mixture_scale)
    up = upper_bound(est.log_ratio, est.variance, prev.alpha, state.mixture_scale)
    rec = StepEvidence(alpha=prev.alpha, max_log_evidence=max(prev.max_log_evidence, ev),
                       min_upper_log=min(prev.min_upper_log, up), looks=prev.looks + 1, last=est.as_dict())
    return replace(state, steps={**state.steps, key: rec}, looks=state.looks + 1), est, None
