"""The CTR check's sequential test: is the canary's click rate credibly below
``(1 - margin)`` x control's, judged at every look of a rollout without inflating the error
rate. A one-sided mixture SPRT (mSPRT) on the log rate ratio, conditional on each batch's
total clicks; see :func:`ctr_log_evidence` for the model and why.

The state (:class:`CtrState`) is immutable and travels between looks through XCom;
:func:`update_ctr_state` adds one look, :func:`ctr_ratio_upper_bound` is the matching
always-valid confidence bound. :func:`naive_fixed_horizon_pvalue` is the comparison the
tests and the benchmark make, never used for gating.

What scipy lacks and so lives here: the conditional-binomial log-likelihood with a changing
exposure offset per batch, its mixture integral over a half-normal (a fixed log-spaced
Simpson rule around the integrand's mode, see _GRID_POINTS), and the quasi-likelihood
dispersion. Root finding is scipy's. scipy loads inside the functions that use it, so
importing the analysis stays cheap for the DAG's processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dayloop.rollout.analysis.inputs import Thresholds, why_unusable

# Points on each side of the mode in the quadrature of the CTR mixture (see _log_mixture):
# 129 keeps the log evidence within ~1e-6 of scipy's adaptive quadrature (unit tests) and
# of a 20x finer rule, from no clicks to millions, at ~70 us for five batches.
_GRID_POINTS = 129  # odd, for Simpson's rule
_UNIT = np.linspace(0.0, 1.0, _GRID_POINTS)
_SIMPSON = np.array([1.0] + [4.0 if i % 2 else 2.0 for i in range(1, _GRID_POINTS - 1)] + [1.0])
# Resolution of the CTR upper bound's root finding on the log rate ratio: a relative 1e-6
# on the bound, as the regula falsi it replaced stopped at, far below what a message shows.
_BOUND_XTOL = 1e-6


@dataclass(frozen=True)
class CtrBatch:
    """Counts of one disjoint slice of time: a step's window, or the part of it added since
    the previous look at the same step."""

    step: str
    canary_impressions: float
    canary_clicks: float
    control_impressions: float
    control_clicks: float


@dataclass(frozen=True)
class CtrState:
    """The CTR test's memory across the looks of one rollout (immutable; serialise with
    :meth:`to_dict` for XCom).

    ``batches`` hold every disjoint slice seen so far; ``p_value`` is the always-valid
    p-value, the running minimum of 1 / evidence over all looks, so a look can only lower
    it; ``looks`` counts updates and ``last_step`` names the step of the latest look (only
    that step's window may grow). The test settings are frozen at the first look: changing
    the margin or the mixture half-way would void the guarantee.
    """

    margin: float
    mixture_scale: float
    dispersion: float
    batches: tuple[CtrBatch, ...] = ()
    p_value: float = 1.0
    looks: int = 0
    last_step: str | None = None

    @classmethod
    def start(cls, thresholds: Thresholds) -> CtrState:
        """A fresh state with the test settings of ``thresholds``."""
        return cls(margin=thresholds.ctr_margin, mixture_scale=thresholds.ctr_mixture_scale,
                   dispersion=thresholds.ctr_dispersion)

    def totals(self) -> tuple[float, float, float, float]:
        """(canary impressions, canary clicks, control impressions, control clicks) so far."""
        arr = np.array([[b.canary_impressions, b.canary_clicks, b.control_impressions, b.control_clicks]
                        for b in self.batches], dtype=np.float64).reshape(-1, 4)
        ci, cc, ki, kc = arr.sum(axis=0)
        return float(ci), float(cc), float(ki), float(kc)

    def rate_ratio(self) -> float:
        """Canary / control clicks per impression over all batches (NaN without data)."""
        ci, cc, ki, kc = self.totals()
        if ci <= 0 or ki <= 0 or kc <= 0:
            return math.nan
        return (cc / ci) / (kc / ki)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through :meth:`from_dict`)."""
        return {
            "margin": self.margin,
            "mixture_scale": self.mixture_scale,
            "dispersion": self.dispersion,
            "batches": [asdict(b) for b in self.batches],
            "p_value": self.p_value,
            "looks": self.looks,
            "last_step": self.last_step,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> CtrState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            margin=float(doc["margin"]),
            mixture_scale=float(doc["mixture_scale"]),
            dispersion=float(doc["dispersion"]),
            batches=tuple(CtrBatch(**{**b, "step": str(b["step"])}) for b in doc.get("batches", ())),
            p_value=float(doc.get("p_value", 1.0)),
            looks=int(doc.get("looks", 0)),
            last_step=None if doc.get("last_step") is None else str(doc["last_step"]),
        )


def _batch_arrays(batches: Sequence[CtrBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canary clicks, control clicks and log exposure ratio of the batches that carry
    information (both arms exposed)."""
    use = [b for b in batches if b.canary_impressions > 0 and b.control_impressions > 0]
    x = np.array([b.canary_clicks for b in use], dtype=np.float64)
    y = np.array([b.control_clicks for b in use], dtype=np.float64)
    off = np.array([math.log(b.canary_impressions / b.control_impressions) for b in use], dtype=np.float64)
    return x, y, off


def _loglik(theta: np.ndarray, x: np.ndarray, y: np.ndarray, off: np.ndarray, dispersion: float) -> np.ndarray:
    """Conditional log-likelihood of the log rate ratio ``theta`` (vectorised over theta):
    given a batch's total clicks, the canary's share is Binomial with logit ``theta + off``,
    so ``x log p + y log(1 - p) = -(x softplus(-eta) + y softplus(eta))``. Binomial
    coefficients cancel in every ratio, which also makes fractional counts (increase()
    extrapolates) harmless. Divided by the dispersion (quasi-likelihood)."""
    eta = theta[:, None] + off[None, :]
    # softplus(eta) once; softplus(-eta) = softplus(eta) - eta (one exp and one log1p
    # per point instead of logaddexp's two: this loop is the cost of the benchmark)
    sp = np.maximum(eta, 0.0) + np.log1p(np.exp(-np.abs(eta)))
    ll = eta @ x - sp @ (x + y)
    return ll / dispersion


def _centre(x: np.ndarray, y: np.ndarray, off: np.ndarray, dispersion: float) -> tuple[float, float]:
    """Where the likelihood peaks and how wide it is: the conditional MLE of theta (Newton
    on the concave log-likelihood, a quarter click added per arm and batch so that zero
    counts keep it finite) and its standard error; a starting point for root finding."""
    xs, ys = x + 0.25, y + 0.25
    n = xs + ys
    theta = math.log(xs.sum() / ys.sum()) - float(np.dot(off, n) / n.sum())
    info = 1.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(theta + off)))
        grad = float((xs - n * p).sum())
        info = float((n * p * (1 - p)).sum())
        move = max(-1.0, min(1.0, grad / info))
        theta += move
        if abs(move) < 1e-9:
            break
    return theta, math.sqrt(dispersion / info)


def _integrand_mode(theta0: float, tau: float, x: np.ndarray, y: np.ndarray, off: np.ndarray,
                    dispersion: float) -> tuple[float, float, float]:
    """Mode, width and slope of the log mixture integrand
    ``g(theta) = loglik(theta) - (theta - theta0)^2 / (2 tau^2)`` on ``theta <= theta0``.
    g is concave with curvature at least 1/tau^2, so damped Newton finds the mode and the
    integrand is negligible beyond ~10 tau from it."""
    n = x + y
    theta = theta0
    for _ in range(200):
        p = 1.0 / (1.0 + np.exp(-(theta + off)))
        grad = float((x - n * p).sum()) / dispersion - (theta - theta0) / tau**2
        curv = float((n * p * (1 - p)).sum()) / dispersion + 1.0 / tau**2
        if theta >= theta0 and grad >= 0:  # the boundary itself is the constrained mode
            return theta0, 1.0 / math.sqrt(curv), grad
        move = grad / curv
        # Newton can overshoot where the likelihood flattens (no canary clicks at all);
        # the curvature bound keeps 3 tau steps safe and still fast.
        move = max(-3.0 * tau, min(3.0 * tau, move))
        new = min(theta + move, theta0)
        if abs(new - theta) < 1e-10 * (1.0 + abs(theta)):
            theta = new
            break
        theta = new
    return theta, 1.0 / math.sqrt(curv), 0.0


def _side(fine: float, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets t in (0, extent] and weights w with sum(w * f(t)) ~ integral of f over
    [0, extent]: Simpson's rule in u = log t on a uniform grid (f(e^u) e^u is smooth in u
    whatever the scale of f), plus a trapezoid on [0, fine] whose left end is the mode,
    so the caller adds ``fine / 2`` to the mode's weight."""
    fine = min(fine, 1e-3 * extent)
    lo, hi = math.log(fine), math.log(extent)
    t = np.exp(lo + (hi - lo) * _UNIT)
    w = _SIMPSON * ((hi - lo) / (_GRID_POINTS - 1) / 3.0) * t
    w[0] += fine / 2.0
    return t, w


def _log_mixture(theta0: float, tau: float, x: np.ndarray, y: np.ndarray, off: np.ndarray,
                 dispersion: float) -> float:
    """log of the mixture likelihood ratio against theta0, by quadrature around the
    integrand's mode: on each side, log-spaced points from a fraction of its local width
    (or of the decay length when the mode sits on the boundary) out to 10 mixture scales,
    so one rule serves a handful of clicks and millions. Summed in log space so huge
    counts cannot overflow."""
    if x.size == 0:
        return 0.0
    mode, width, slope = _integrand_mode(theta0, tau, x, y, off, dispersion)
    fine = 1e-3 * (min(width, 1.0 / slope) if slope > 0 else width)
    reach = 10.0 * (tau + width)
    left_t, left_w = _side(fine, reach)
    thetas, weights = [mode - left_t], [left_w]
    mode_w = min(fine, 1e-3 * reach) / 2.0
    gap = theta0 - mode
    if gap > 0:  # interior mode: the right side runs up to the boundary
        right_t, right_w = _side(fine, min(reach, gap))
        thetas.append(mode + right_t)
        weights.append(right_w)
        mode_w += min(fine, 1e-3 * min(reach, gap)) / 2.0
    theta = np.concatenate([*thetas, [mode, theta0]])
    w = np.concatenate([*weights, [mode_w, 0.0]])
    ll = _loglik(theta, x, y, off, dispersion)
    delta = theta - theta0
    log_f = (ll - ll[-1]) + math.log(2.0 / (tau * math.sqrt(2.0 * math.pi))) - delta**2 / (2.0 * tau**2)
    peak = float(log_f.max())
    area = float(np.dot(w, np.exp(log_f - peak)))
    return peak + math.log(area) if area > 0 else -math.inf


def ctr_log_evidence(batches: Sequence[CtrBatch], margin: float, mixture_scale: float,
                     dispersion: float = 1.0, *, boundary: float | None = None) -> float:
    """log of the mixture likelihood ratio that the canary's click rate is below
    ``(1 - margin)`` x control's (or below ``exp(boundary)`` x when ``boundary`` is given).

    Model and why. Clicks are counts (a list can earn several), so each arm's clicks in a
    batch are Poisson with mean rate x impressions. Conditional on a batch's total clicks,
    the canary's clicks are Binomial with ``logit p = theta + log(E_canary / E_control)``,
    ``theta = log(rate_canary / rate_control)``: the baseline CTR drops out exactly, and
    the changing traffic split of a ramp only moves the known offset. The null
    ``theta >= theta0 = log(1 - margin)`` ("not worse than the margin") is tested against a
    half-normal mixture of alternatives ``theta0 - |N(0, mixture_scale^2)|`` (the one-sided
    mSPRT of Johari, Pekelis and Walsh, "Always Valid Inference"), integrated numerically.

    The binomial is a one-parameter exponential family in theta, so for every alternative
    below theta0 the likelihood ratio is a non-negative supermartingale under every theta
    at or above theta0; so is the mixture, and Ville's inequality bounds the chance that it
    ever reaches 1/alpha by alpha, however often it is looked at. Alternatives considered:
    the closed-form normal mixture on the estimated log ratio needs a plug-in variance that
    is poor at tens of clicks and undefined at zero; a conjugate beta-binomial mixture
    needs a constant canary share, which a ramp changes every step. With ``dispersion`` >
    1 the log-likelihood is divided by it (quasi-Poisson); that keeps the evidence honest
    for over-dispersed clicks approximately, not exactly.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    theta0 = math.log(1.0 - margin) if boundary is None else float(boundary)
    x, y, off = _batch_arrays(batches)
    return _log_mixture(theta0, float(mixture_scale), x, y, off, float(dispersion))


def update_ctr_state(state: CtrState, step: str | int | None, canary_impressions: float, canary_clicks: float,
                     control_impressions: float, control_clicks: float) -> CtrState:
    """The state after one more look. Counts are the step window's totals since the step
    began; a look at the same ``step`` as the previous one contributes only what was added
    since then (the window grew), a new ``step`` a new batch; ``step=None`` always means a
    new, disjoint window. Negative growth (extrapolation jitter of ``increase()``) counts as
    zero. Raises ValueError when a step comes back after a later one, or on invalid counts."""
    values = (canary_impressions, canary_clicks, control_impressions, control_clicks)
    if any(why_unusable(v) for v in values):
        raise ValueError(f"CTR counts must be finite and >= 0, got {values}")
    key = f"look-{state.looks}" if step is None else str(step)
    batches = list(state.batches)
    seen = [b for b in batches if b.step == key]
    if seen and state.last_step != key:
        raise ValueError(f"step {key!r} was looked at before a later step; windows must not go back")
    prior = np.array([[b.canary_impressions, b.canary_clicks, b.control_impressions, b.control_clicks]
                      for b in seen], dtype=np.float64).reshape(-1, 4).sum(axis=0)
    inc = np.maximum(np.asarray(values, dtype=np.float64) - prior, 0.0)
    # Only a slice where both arms were exposed says anything about the ratio; otherwise
    # the counts stay out of the batches and come back with the next look's growth.
    if inc[0] > 0 and inc[2] > 0:
        batches.append(CtrBatch(key, *(float(v) for v in inc)))
    log_ev = ctr_log_evidence(batches, state.margin, state.mixture_scale, state.dispersion)
    p_now = 1.0 if log_ev <= 0 else math.exp(-log_ev)
    return CtrState(margin=state.margin, mixture_scale=state.mixture_scale, dispersion=state.dispersion,
                    batches=tuple(batches), p_value=min(state.p_value, p_now), looks=state.looks + 1,
                    last_step=key)


def ctr_ratio_upper_bound(state: CtrState, alpha: float) -> float:
    """Always-valid one-sided (1 - alpha) upper confidence bound on canary / control clicks
    per impression from the batches so far: the largest boundary the mixture test does not
    reject at ``alpha`` (found by root finding on the log ratio). ``inf`` without data."""
    from scipy.optimize import brentq

    x, y, off = _batch_arrays(state.batches)
    if x.size == 0 or x.sum() + y.sum() <= 0:
        return math.inf
    target = math.log(1.0 / alpha)
    centre = _centre(x, y, off, state.dispersion)

    def gap(b: float) -> float:
        return _log_mixture(b, state.mixture_scale, x, y, off, state.dispersion) - target

    # The evidence grows with the boundary b: bracket the crossing from the estimate up, then
    # let Brent's method find it (the log evidence is smooth: a handful of evaluations).
    lo, width = centre[0], 2.0 * (centre[1] + state.mixture_scale)
    f_lo = gap(lo)
    for _ in range(60):  # the estimate itself is normally far from rejected; make sure
        if f_lo < 0:
            break
        lo -= width
        f_lo = gap(lo)
    else:
        return math.nan
    # With few clicks the mixture, concentrated within a few mixture scales of the
    # boundary, cannot reject even absurd boundaries: past e^10 x the estimate, say inf.
    hi, f_hi = lo + width, gap(lo + width)
    while f_hi < 0:
        if hi > centre[0] + 10.0:
            return math.inf
        lo = hi
        width *= 2.0
        hi = min(hi + width, centre[0] + 10.5)
        f_hi = gap(hi)
    return math.exp(brentq(gap, lo, hi, xtol=_BOUND_XTOL))


def naive_fixed_horizon_pvalue(canary_impressions: float, canary_clicks: float, control_impressions: float,
                               control_clicks: float, margin: float, dispersion: float = 1.0) -> float:
    """One-sided z-test p-value of "canary rate >= (1 - margin) x control rate" on the log
    rate ratio, variance ``1/x + 1/y`` (+0.5 per arm so zero counts stay finite). Valid for
    ONE pre-planned look only: checked at every look it rejects far more often than its
    level (see the unit tests and the benchmark). Kept for that comparison, not for gating."""
    from scipy.special import ndtr

    if canary_impressions <= 0 or control_impressions <= 0:
        return 1.0
    x, y = canary_clicks + 0.5, control_clicks + 0.5
    est = math.log(x / canary_impressions) - math.log(y / control_impressions)
    se = math.sqrt(dispersion * (1.0 / x + 1.0 / y))
    return float(ndtr((est - math.log(1.0 - margin)) / se))
