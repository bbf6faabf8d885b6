"""Canary analysis: pure functions of the counts observed over one step of a rollout.

The caller (the rollout DAG) queries Prometheus for each version's counters over the step's
window ``[step_start, now]`` (``sum by (version) (increase(...))``, histogram buckets
``sum by (version, le)``), builds one :class:`VersionWindow` per version and calls
:func:`analyse`. Nothing here does I/O or reads a clock, so the same function runs in the
DAG, in the unit tests and thousands of times in ``benchmarks/bench_rollout_analysis.py``.

Every check answers ``pass``, ``fail`` or ``inconclusive`` with a message that carries its
numbers; the worst phase wins (fail > inconclusive > pass). Two rules hold throughout:

* a missing series, an invalid number or too few samples is never read as healthy: such a
  check is ``inconclusive`` (the DAG keeps baking, then fails safe);
* below the minimum sample size a check may still *fail*, but only where the failure does
  not depend on sample size: a non-finite output (zero tolerance) and the CTR test, whose
  always-valid p-value holds at every look whatever the counts.

Imports: numpy at module level, scipy.special only inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from typing import Any, Literal

import numpy as np

from dayloop.quality.stats import PSI_EPSILON

Phase = Literal["pass", "fail", "inconclusive"]
PASS: Phase = "pass"
FAIL: Phase = "fail"
INCONCLUSIVE: Phase = "inconclusive"
_SEVERITY = {PASS: 0, INCONCLUSIVE: 1, FAIL: 2}

# Points on each side of the mode in the quadrature of the CTR mixture (see _log_mixture):
# 129 keeps the log evidence within ~1e-6 of scipy's adaptive quadrature (unit tests) and
# of a 20x finer rule, from no clicks to millions, at ~70 us for five batches.
_GRID_POINTS = 129  # odd, for Simpson's rule
_UNIT = np.linspace(0.0, 1.0, _GRID_POINTS)
_SIMPSON = np.array([1.0] + [4.0 if i % 2 else 2.0 for i in range(1, _GRID_POINTS - 1)] + [1.0])
# Merge adjacent score bins until every cell of the 2 x bins table expects this many
# observations: the chi-square approximation behind the drift test needs it (Cochran).
_MIN_EXPECTED_PER_CELL = 5.0


def worst_phase(phases: Iterable[str]) -> Phase:
    """The most severe of ``phases`` (fail > inconclusive > pass); no phases at all is
    ``inconclusive``, since nothing was checked."""
    worst: Phase | None = None
    for phase in phases:
        if phase not in _SEVERITY:
            raise ValueError(f"unknown phase {phase!r}")
        if worst is None or _SEVERITY[phase] > _SEVERITY[worst]:
            worst = phase  # type: ignore[assignment]
    return INCONCLUSIVE if worst is None else worst


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Histogram:
    """One version's histogram over the window, as Prometheus exposes it: bucket upper
    bounds (``le``) in increasing order and the cumulative count at each bound. A complete
    Prometheus histogram ends with the ``+Inf`` bucket, whose count is the total."""

    upper_bounds: tuple[float, ...]
    cumulative: tuple[float, ...]

    def __post_init__(self) -> None:
        bounds = tuple(float(b) for b in self.upper_bounds)
        counts = tuple(float(c) for c in self.cumulative)
        if not bounds or len(bounds) != len(counts):
            raise ValueError(f"histogram needs as many counts as bounds (>= 1), got {len(bounds)} and {len(counts)}")
        if any(math.isnan(b) for b in bounds) or any(b >= c for b, c in pairwise(bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {bounds}")
        object.__setattr__(self, "upper_bounds", bounds)
        object.__setattr__(self, "cumulative", counts)

    @classmethod
    def from_prometheus(cls, buckets: Iterable[tuple[str | float, float]]) -> Histogram:
        """Build from ``(le, value)`` pairs in any order, ``le`` as Prometheus writes it
        (``"0.005"``, ``"+Inf"``), e.g. the samples of ``sum by (le) (increase(x_bucket[w]))``."""
        pairs = sorted((float(le), float(v)) for le, v in buckets)
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @property
    def complete(self) -> bool:
        """Whether the last bucket is ``+Inf`` (its count is then the total)."""
        return math.isinf(self.upper_bounds[-1]) and self.upper_bounds[-1] > 0

    def valid(self) -> bool:
        """All counts finite and non-negative."""
        return all(math.isfinite(c) and c >= 0 for c in self.cumulative)

    def monotone(self) -> np.ndarray:
        """Cumulative counts forced non-decreasing. ``increase()`` extrapolates each bucket
        series on its own, so neighbouring buckets can disagree by a little; Prometheus's
        ``histogram_quantile`` repairs this the same way (running maximum)."""
        return np.maximum.accumulate(np.asarray(self.cumulative, dtype=np.float64))

    def bin_counts(self) -> np.ndarray:
        """Observations per bucket (not cumulative): bucket i covers (bound[i-1], bound[i]]."""
        return np.diff(self.monotone(), prepend=0.0)

    @property
    def count(self) -> float:
        """Total observations (the last cumulative count)."""
        return float(self.monotone()[-1])


@dataclass(frozen=True)
class VersionWindow:
    """What one version did over the step's window. Counts are ``increase()`` values, so
    they may be fractional; ``None`` means the series was absent from Prometheus's answer,
    which is never read as zero.

    * ``requests``: attempts on the version (``dayloop_router_requests_total``);
    * ``errors``: failed attempts, all reasons summed (``dayloop_router_errors_total``);
    * ``nonfinite``: attempts whose embedding or scores held NaN/Inf;
    * ``impressions`` / ``clicks``: lists served by the version and clicks on them;
    * ``latency``: ``dayloop_router_request_seconds`` buckets, seconds;
    * ``scores``: ``dayloop_router_score`` buckets (top-1 score of each list).

    The router creates a version's ``errors``, ``nonfinite`` and ``clicks`` series at their
    first event, so a healthy version can lack them. The query may read such an absence as 0
    only where the version's requests series is present over the same window (e.g.
    ``increase(x[w]) or (increase(requests[w]) * 0)`` by version), never unconditionally.
    """

    requests: float | None = None
    errors: float | None = None
    nonfinite: float | None = None
    impressions: float | None = None
    clicks: float | None = None
    latency: Histogram | None = None
    scores: Histogram | None = None


@dataclass(frozen=True)
class Thresholds:
    """Limits of the canary analysis (overridable per run, see :meth:`from_mapping`).

    * ``max_error_ratio``: errors / requests of the canary, a budget read on the point
      estimate (Flagger style). Keep ``min_requests`` several times ``1 / max_error_ratio``
      so that one or two unlucky errors cannot breach it.
    * ``max_error_ratio_vs_control``: absolute excess over control's ratio. Two small ratios
      are compared, so the canary's ratio enters as its one-sided (1 - ``alpha``) Wilson
      lower bound: sampling noise alone does not trip it.
    * ``max_nonfinite``: non-finite outputs tolerated on the canary (0: any NaN fails, at
      any sample size).
    * ``p99_budget_s``: absolute p99 latency budget (histogram_quantile of the window).
    * ``max_p99_ratio_vs_control`` / ``p99_slack_s``: the canary's p99 may reach
      ``ratio * control_p99 + slack``. The slack absorbs bucket width (interpolation inside
      a bucket is linear) and the noise of a p99 from a few hundred samples.
    * ``max_score_drift``: PSI between the canary's and control's top-1 score histograms.
      It fails only if a chi-square test of homogeneity on the same bins also rejects at
      ``drift_alpha``: the PSI of two samples from one distribution is about
      ``(bins - 1) * (1/n1 + 1/n2)`` on average (0.08 at 100 lists per arm over 5 bins),
      so PSI alone would call noise a drift on small windows.
    * ``ctr_margin``: relative non-inferiority margin on clicks per impression; the CTR
      check fails when the canary is credibly worse than ``(1 - margin) x`` control.
    * ``alpha``: level of the CTR test over the whole rollout (all looks, all steps), and
      of the Wilson bound above.
    * ``ctr_mixture_scale``: standard deviation of the half-normal mixture over the log
      rate ratio (see :func:`ctr_log_evidence`): the drop size the test is tuned to. 0.1 is
      a middle ground; the benchmark measured 0.2 best at demo counts (where only drops of
      ~30 % are detectable) and 0.05 best for 5 % drops at prod counts.
    * ``ctr_dispersion``: variance / mean of clicks (quasi-Poisson). 1 for Poisson clicks;
      raise it when users click in bursts or repeat within a window: clicks with variance
      2.5 x the mean read as Poisson took the worst-case false alarms from <1 % to ~8 % at
      alpha 0.05 in the benchmark. Prometheus counters cannot estimate it.
    * ``min_requests``: fewer canary (or control) requests in the window: error and latency
      checks are inconclusive.
    * ``min_impressions``: fewer impressions (lists with a score) per arm in the window:
      CTR and score checks are inconclusive (CTR can still fail, see the module doc).
    """

    max_error_ratio: float = 0.01
    max_error_ratio_vs_control: float = 0.005
    max_nonfinite: float = 0.0
    p99_budget_s: float = 0.25
    max_p99_ratio_vs_control: float = 1.5
    p99_slack_s: float = 0.010
    max_score_drift: float = 0.25
    drift_alpha: float = 0.001
    ctr_margin: float = 0.02
    alpha: float = 0.05
    ctr_mixture_scale: float = 0.1
    ctr_dispersion: float = 1.0
    min_requests: float = 200
    min_impressions: float = 200

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"threshold {f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"threshold {f.name} must be >= 0, got {value}")
        for name in ("max_error_ratio", "ctr_margin", "alpha", "drift_alpha"):
            if not getattr(self, name) < 1:
                raise ValueError(f"threshold {name} must be < 1, got {getattr(self, name)}")
        for name in ("alpha", "drift_alpha", "ctr_mixture_scale", "max_p99_ratio_vs_control"):
            if getattr(self, name) <= 0:
                raise ValueError(f"threshold {name} must be > 0, got {getattr(self, name)}")
        if self.ctr_dispersion < 1:
            raise ValueError(f"ctr_dispersion must be >= 1 (1 = Poisson), got {self.ctr_dispersion}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Thresholds | None = None) -> Thresholds:
        """``base`` (default: the defaults) with ``values`` applied; unknown keys are an
        error, so a misspelt run Param cannot be silently ignored."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown analysis thresholds {unknown}; known: {sorted(known)}")
        return cls(**{**asdict(base), **{k: float(v) for k, v in values.items()}})

    def as_dict(self) -> dict[str, float]:
        """Plain dict (JSON, XCom, MLflow params)."""
        return asdict(self)


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``name``, ``phase``, a message with its numbers, and the
    numbers themselves in ``values``."""

    name: str
    phase: Phase
    message: str
    values: Mapping[str, float | int | str | bool | None] = field(default_factory=dict)
    advisory: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for strict JSON (XCom): NaN and infinite values become None (the
        message keeps them)."""
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.values.items()}
        return {"name": self.name, "phase": self.phase, "message": self.message, "values": values,
                "advisory": self.advisory}


@dataclass(frozen=True)
class Analysis:
    """The verdict on one look: the worst phase of ``checks``, and the CTR test's state to
    pass to the next look of the same rollout."""

    phase: Phase
    checks: tuple[Check, ...]
    ctr_state: CtrState | None = None

    @property
    def reasons(self) -> list[str]:
        """``"name: message"`` of every check that did not pass (advisory ones marked so)."""
        return [f"{c.name}{' (advisory)' if c.advisory else ''}: {c.message}"
                for c in self.checks if c.phase != PASS]

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if it did not run)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON, XCom); the CTR state as :meth:`CtrState.to_dict`."""
        return {
            "phase": self.phase,
            "checks": [c.as_dict() for c in self.checks],
            "ctr_state": None if self.ctr_state is None else self.ctr_state.to_dict(),
        }


# --------------------------------------------------------------------------- helpers


def _missing(value: float | None) -> str | None:
    """Why a count cannot be used, or None when it can."""
    if value is None:
        return "series missing"
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return f"invalid value {value!r}"
    return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _two(value: float, limit: float, digits: int = 3) -> tuple[str, str]:
    """``value`` and ``limit`` with just enough decimals that a breach never reads as
    "0.010 > max 0.010"."""
    for d in range(digits, digits + 4):
        a, b = f"{value:.{d}f}", f"{limit:.{d}f}"
        if a != b:
            break
    return a, b


def histogram_quantile(q: float, hist: Histogram) -> float:
    """The q-quantile the way Prometheus's ``histogram_quantile`` computes it: NaN without
    a ``+Inf`` bucket or observations; linear interpolation inside the bucket holding rank
    ``q * total`` (the first bucket starts at 0 when its bound is positive); a rank in the
    ``+Inf`` bucket answers the largest finite bound."""
    value, _ = _quantile(q, hist)
    return value


def _quantile(q: float, hist: Histogram) -> tuple[float, bool]:
    """(value, above_top): ``above_top`` when the rank fell in the +Inf bucket, so the true
    quantile is only known to exceed ``value``."""
    if math.isnan(q):
        return math.nan, False
    if q < 0:
        return -math.inf, False
    if q > 1:
        return math.inf, False
    if not hist.complete or len(hist.upper_bounds) < 2:
        return math.nan, False
    bounds = hist.upper_bounds
    counts = hist.monotone()
    total = counts[-1]
    if not total > 0:
        return math.nan, False
    rank = q * total
    # first bucket whose cumulative count reaches the rank, searched among the finite ones
    b = int(np.searchsorted(counts[:-1], rank, side="left"))
    if b == len(bounds) - 1:
        return bounds[-2], True
    if b == 0 and bounds[0] <= 0:
        return bounds[0], False
    start, end, in_bucket = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        in_bucket -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / in_bucket), False


def binned_psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
               epsilon: float = PSI_EPSILON) -> float:
    """PSI of ``actual`` against ``expected`` given as counts on the same bins: shares
    floored at ``epsilon`` (as the offline gate does), ``sum((a - e) * ln(a / e))``."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"expected and actual must be 1-d counts on the same bins, got {e.shape} and {a.shape}")
    if not (e.sum() > 0 and a.sum() > 0):
        raise ValueError("both histograms need observations")
    es = np.maximum(e / e.sum(), epsilon)
    as_ = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((as_ - es) * np.log(as_ / es)))


def _merge_sparse_bins(table: np.ndarray) -> np.ndarray:
    """Merge adjacent columns of a 2 x bins count table until every cell's expected count
    under homogeneity reaches _MIN_EXPECTED_PER_CELL (a short last group joins the previous
    one). The merge looks at pooled counts only, so it cannot favour either arm."""
    pooled = table.sum(axis=0)
    total = pooled.sum()
    need = _MIN_EXPECTED_PER_CELL * total / table.sum(axis=1).min()
    groups: list[list[int]] = []
    acc = 0.0
    current: list[int] = []
    for j, n in enumerate(pooled):
        current.append(j)
        acc += n
        if acc >= need:
            groups.append(current)
            current, acc = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return np.stack([table[:, g].sum(axis=1) for g in groups], axis=1)


# --------------------------------------------------------------------------- CTR test


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
    if any(_missing(v) for v in values):
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
    x, y, off = _batch_arrays(state.batches)
    if x.size == 0 or x.sum() + y.sum() <= 0:
        return math.inf
    target = math.log(1.0 / alpha)
    centre = _centre(x, y, off, state.dispersion)

    def gap(b: float) -> float:
        return _log_mixture(b, state.mixture_scale, x, y, off, state.dispersion) - target

    # The evidence grows with the boundary b; bracket the crossing from the estimate up,
    # then regula falsi with the Illinois fix (the log evidence is smooth: ~6 evaluations).
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
        lo, f_lo = hi, f_hi
        width *= 2.0
        hi = min(hi + width, centre[0] + 10.5)
        f_hi = gap(hi)
    side = 0
    for _ in range(100):
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        f_mid = gap(mid)
        if abs(f_mid) < 1e-4 or hi - lo < 1e-6:
            return math.exp(mid)
        if f_mid >= 0:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2.0
            side = 1
        else:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2.0
            side = -1
    return math.exp(0.5 * (lo + hi))


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


# --------------------------------------------------------------------------- checks


def _check_nonfinite(canary: VersionWindow, t: Thresholds) -> Check:
    name = "nonfinite"
    why = _missing(canary.nonfinite)
    if why:
        return Check(name, INCONCLUSIVE, f"canary non-finite outputs: {why}", {"nonfinite": None})
    n = float(canary.nonfinite)  # type: ignore[arg-type]
    values = {"nonfinite": n, "max": t.max_nonfinite}
    if n > t.max_nonfinite:
        return Check(name, FAIL, f"{n:g} non-finite outputs > tolerance {t.max_nonfinite:g}", values)
    return Check(name, PASS, f"{n:g} non-finite outputs (tolerance {t.max_nonfinite:g})", values)


def _error_ratio(w: VersionWindow, who: str, t: Thresholds) -> tuple[float | None, str | None]:
    """(ratio, None) or (None, why not)."""
    for label, v in (("requests", w.requests), ("errors", w.errors)):
        why = _missing(v)
        if why:
            return None, f"{who} {label}: {why}"
    req, err = float(w.requests), float(w.errors)  # type: ignore[arg-type]
    if req < t.min_requests:
        return None, f"too few {who} requests: {req:g} < {t.min_requests:g}"
    return min(err / req, 1.0), None


def _check_error_ratio(canary: VersionWindow, t: Thresholds) -> Check:
    name = "error_ratio"
    ratio, why = _error_ratio(canary, "canary", t)
    if ratio is None:
        return Check(name, INCONCLUSIVE, why or "", {"requests": canary.requests, "errors": canary.errors})
    values = {"ratio": ratio, "max": t.max_error_ratio, "requests": canary.requests, "errors": canary.errors}
    detail = f"({canary.errors:g} of {canary.requests:g} requests)"
    shown, limit = _two(ratio, t.max_error_ratio)
    if ratio > t.max_error_ratio:
        return Check(name, FAIL, f"error ratio {shown} > max {limit} {detail}", values)
    return Check(name, PASS, f"error ratio {shown} <= max {limit} {detail}", values)


def _wilson_lower(successes: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Wilson score lower bound of a proportion."""
    from scipy.special import ndtri

    if n <= 0:
        return 0.0
    z = float(ndtri(1.0 - alpha))
    p = min(max(successes / n, 0.0), 1.0)
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


def _check_error_vs_control(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "error_ratio_vs_control"
    c_ratio, why = _error_ratio(canary, "canary", t)
    k_ratio, why_k = _error_ratio(control, "control", t)
    if c_ratio is None or k_ratio is None:
        return Check(name, INCONCLUSIVE, "; ".join(w for w in (why, why_k) if w), {})
    lower = _wilson_lower(float(canary.errors), float(canary.requests), t.alpha)  # type: ignore[arg-type]
    excess = lower - k_ratio
    values = {"canary_ratio": c_ratio, "canary_lower_bound": lower, "control_ratio": k_ratio,
              "excess": excess, "max_excess": t.max_error_ratio_vs_control}
    shown, limit = _two(excess, t.max_error_ratio_vs_control, 4)
    text = (f"canary error ratio {c_ratio:.4f} ({1 - t.alpha:.0%} lower bound {lower:.4f}) vs control "
            f"{k_ratio:.4f}: excess {shown}")
    if excess > t.max_error_ratio_vs_control:
        return Check(name, FAIL, f"{text} > max {limit}", values)
    return Check(name, PASS, f"{text} <= max {limit}", values)


def _p99(w: VersionWindow, who: str, t: Thresholds) -> tuple[float | None, bool, str | None]:
    """(p99, above_top, None) or (None, False, why not)."""
    h = w.latency
    if h is None:
        return None, False, f"{who} latency histogram: series missing"
    if not h.valid():
        return None, False, f"{who} latency histogram: invalid counts"
    if not h.complete:
        return None, False, f"{who} latency histogram has no +Inf bucket"
    if h.count < t.min_requests:
        return None, False, f"too few {who} latency observations: {h.count:g} < {t.min_requests:g}"
    value, above = _quantile(0.99, h)
    return value, above, None


def _count_above(h: Histogram, x: float) -> float:
    """Observations above ``x``, interpolating linearly inside the bucket that holds ``x``
    (above the top finite bound, everything past it counts)."""
    cum = h.monotone()
    total = float(cum[-1])
    lower, below = 0.0, 0.0
    for bound, count in zip(h.upper_bounds, cum, strict=True):
        if x <= bound:
            if math.isinf(bound):
                return total - below
            share = (x - lower) / (bound - lower) if bound > lower else 1.0
            return total - (below + (float(count) - below) * share)
        lower, below = bound, float(count)
    return total - below


def _exceedance_pvalue(h: Histogram, limit: float) -> tuple[float, float, float]:
    """(observations above ``limit``, total, p) where p is the chance of seeing that many or more
    above it if the true p99 were at the limit (1 % above): small windows have a noisy p99 (with
    40 requests it is their maximum), so one slow request must not read as a breach."""
    from scipy.special import bdtrc

    total = h.count
    above = _count_above(h, limit)
    k, n = math.floor(above + 1e-9), max(1, round(total))
    p_value = 1.0 if k <= 0 else float(bdtrc(k - 1, n, 0.01))
    return above, total, p_value


def _check_p99_budget(canary: VersionWindow, t: Thresholds) -> Check:
    name = "latency_p99"
    p99, above, why = _p99(canary, "canary", t)
    if p99 is None:
        return Check(name, INCONCLUSIVE, why or "", {})
    shown = f">= {_ms(p99)} (above the top bucket)" if above else _ms(p99)
    values = {"p99_s": p99, "above_top_bucket": above, "budget_s": t.p99_budget_s}
    if p99 > t.p99_budget_s or (above and p99 >= t.p99_budget_s):
        n_above, n, p_value = _exceedance_pvalue(canary.latency, t.p99_budget_s)
        values.update(above_budget=n_above, observations=n, p_value=p_value)
        text = (f"p99 {shown} > budget {_ms(t.p99_budget_s)} ({n_above:.0f} of {n:.0f} above it, "
                f"p = {p_value:.2g} if the true p99 were at the budget)")
        if p_value < t.alpha:
            return Check(name, FAIL, text, values)
        return Check(name, INCONCLUSIVE, f"{text}: not yet significant at {t.alpha:g}", values)
    if above:
        return Check(name, INCONCLUSIVE, f"p99 {shown}: the buckets cannot tell it from the budget "
                     f"{_ms(t.p99_budget_s)}", values)
    return Check(name, PASS, f"p99 {shown} <= budget {_ms(t.p99_budget_s)}", values)


def _check_p99_vs_control(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "latency_p99_vs_control"
    c, c_above, why = _p99(canary, "canary", t)
    k, k_above, why_k = _p99(control, "control", t)
    if c is None or k is None:
        return Check(name, INCONCLUSIVE, "; ".join(w for w in (why, why_k) if w), {})
    limit = t.max_p99_ratio_vs_control * k + t.p99_slack_s
    values = {"canary_p99_s": c, "control_p99_s": k, "limit_s": limit, "canary_above_top_bucket": c_above,
              "control_above_top_bucket": k_above}
    text = (f"canary p99 {_ms(c)} vs control {_ms(k)}: limit {t.max_p99_ratio_vs_control:g} x control + "
            f"{_ms(t.p99_slack_s)} = {_ms(limit)}")
    # Above the top bucket a p99 is only a lower bound: the canary's can still prove a
    # breach, control's can only prove a pass.
    if c > limit and not k_above:
        n_above, n, p_value = _exceedance_pvalue(canary.latency, limit)
        values.update(canary_above_limit=n_above, canary_observations=n, p_value=p_value)
        text = f"{text}; {n_above:.0f} of {n:.0f} canary requests above the limit (p = {p_value:.2g})"
        if p_value < t.alpha:
            return Check(name, FAIL, f"{text} (canary above)", values)
        return Check(name, INCONCLUSIVE, f"{text}: canary above, not yet significant at {t.alpha:g}", values)
    if c <= limit and not c_above:
        return Check(name, PASS, text, values)
    return Check(name, INCONCLUSIVE, f"{text}; a p99 above the top bucket leaves it undecided", values)


def _check_score_drift(canary: VersionWindow, control: VersionWindow, t: Thresholds) -> Check:
    name = "score_drift"
    problems = []
    for who, h in (("canary", canary.scores), ("control", control.scores)):
        if h is None:
            problems.append(f"{who} score histogram: series missing")
        elif not h.valid():
            problems.append(f"{who} score histogram: invalid counts")
        elif h.count < t.min_impressions:
            problems.append(f"too few {who} scores: {h.count:g} < {t.min_impressions:g}")
    if problems:
        return Check(name, INCONCLUSIVE, "; ".join(problems), {})
    assert canary.scores is not None and control.scores is not None
    if canary.scores.upper_bounds != control.scores.upper_bounds:
        return Check(name, INCONCLUSIVE, "canary and control score buckets differ", {})
    from scipy.special import chdtrc

    table = _merge_sparse_bins(np.stack([control.scores.bin_counts(), canary.scores.bin_counts()]))
    psi_value = binned_psi(table[0], table[1])
    bins = table.shape[1]
    if bins >= 2:
        expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
        chi2 = float(((table - expected) ** 2 / expected).sum())
        p_value = float(chdtrc(bins - 1, chi2))
    else:
        chi2, p_value = 0.0, 1.0
    values = {"psi": psi_value, "max_psi": t.max_score_drift, "chi2": chi2, "p_value": p_value, "bins": bins,
              "drift_alpha": t.drift_alpha}
    text = f"score PSI {psi_value:.3f} (chi-square p = {p_value:.2g} over {bins} bins)"
    if psi_value > t.max_score_drift and p_value < t.drift_alpha:
        return Check(name, FAIL, f"{text}: PSI > max {t.max_score_drift:.2f} and p < {t.drift_alpha:g}", values)
    if psi_value > t.max_score_drift:
        return Check(name, INCONCLUSIVE, f"{text}: PSI > max {t.max_score_drift:.2f} but not significant at "
                     f"{t.drift_alpha:g} on these counts", values)
    return Check(name, PASS, f"{text} <= max {t.max_score_drift:.2f}", values)


def _check_ctr(canary: VersionWindow, control: VersionWindow, t: Thresholds, state: CtrState | None,
               step: str | int | None) -> tuple[Check, CtrState]:
    name = "ctr"
    if state is None:
        state = CtrState.start(t)
    elif (state.margin, state.mixture_scale, state.dispersion) != (t.ctr_margin, t.ctr_mixture_scale,
                                                                   t.ctr_dispersion):
        raise ValueError("CTR test settings changed during the rollout: state has margin/scale/dispersion "
                         f"{state.margin}/{state.mixture_scale}/{state.dispersion}, thresholds "
                         f"{t.ctr_margin}/{t.ctr_mixture_scale}/{t.ctr_dispersion}")
    problems = [f"{who} {label}: {why}" for who, w in (("canary", canary), ("control", control))
                for label, v in (("impressions", w.impressions), ("clicks", w.clicks)) if (why := _missing(v))]
    if problems:
        # Earlier evidence still stands: a previous rejection keeps failing.
        if state.p_value <= t.alpha:
            return Check(name, FAIL, f"rejected earlier (always-valid p = {state.p_value:.3g}); now "
                         + "; ".join(problems), {"p_value": state.p_value}), state
        return Check(name, INCONCLUSIVE, "; ".join(problems), {"p_value": state.p_value}), state
    ci, cc = float(canary.impressions), float(canary.clicks)  # type: ignore[arg-type]
    ki, kc = float(control.impressions), float(control.clicks)  # type: ignore[arg-type]
    state = update_ctr_state(state, step, ci, cc, ki, kc)
    ti, tc, tki, tkc = state.totals()
    ratio = state.rate_ratio()
    upper = ctr_ratio_upper_bound(state, t.alpha)
    floor = 1.0 - t.ctr_margin
    values = {"window_canary_ctr": cc / ci if ci > 0 else None, "window_control_ctr": kc / ki if ki > 0 else None,
              "rate_ratio": ratio, "upper_bound": upper, "floor": floor, "p_value": state.p_value,
              "alpha": t.alpha, "canary_impressions": ti, "canary_clicks": tc, "control_impressions": tki,
              "control_clicks": tkc, "looks": state.looks}
    text = (f"CTR ratio canary/control {ratio:.3f} over {ti:g} vs {tki:g} impressions "
            f"({tc:g} vs {tkc:g} clicks, look {state.looks}); always-valid {1 - t.alpha:.0%} upper bound "
            f"{upper:.3f}, p = {state.p_value:.3g} for 'worse than {floor:.2f} x control'")
    if state.p_value <= t.alpha:
        return Check(name, FAIL, f"{text} <= alpha {t.alpha:g}", values), state
    if ci < t.min_impressions or ki < t.min_impressions:
        return Check(name, INCONCLUSIVE, f"too few impressions in the window: canary {ci:g}, control {ki:g} "
                     f"(min {t.min_impressions:g}); {text}", values), state
    return Check(name, PASS, f"{text} > alpha {t.alpha:g}", values), state


# Checks reported with every look but left out of the verdict. Score drift compares two
# different models' raw top-1 scores: a healthy retrain moves their scale (measured PSI 0.7-6
# between retrains with equal seeds, and 1.04 on a healthy canary under the real scheduler),
# so it cannot decide on its own; it is the number to read when another check fails.
ADVISORY_CHECKS = ("score_drift",)


def analyse(canary: VersionWindow, control: VersionWindow | None, thresholds: Thresholds | None = None,
            cumulative: CtrState | None = None, *, step: str | int | None = None,
            advisory: Iterable[str] = ADVISORY_CHECKS) -> Analysis:
    """Judge the canary against control over one step's window.

    Checks: ``nonfinite``, ``error_ratio``, ``latency_p99`` (absolute), and when a control
    arm exists ``error_ratio_vs_control``, ``latency_p99_vs_control``, ``score_drift`` and
    ``ctr``. ``control=None`` means the step routes no traffic to control (100 % canary):
    only the absolute checks run and the CTR state is carried over unchanged.

    Checks named in ``advisory`` (default :data:`ADVISORY_CHECKS`) run and are reported but do
    not count towards the phase; pass ``advisory=()`` to make every check decide.

    ``cumulative`` is the CTR state returned by the previous look of the same rollout
    (None at the first); ``step`` names the step whose window this is, so that a second look
    at a growing window counts only the new part (None: the window is disjoint from every
    earlier one). The returned :class:`Analysis` carries the state for the next look.
    Raises ValueError only for a misuse (test settings changed mid-rollout, a step revisited).
    """
    t = thresholds or Thresholds()
    checks = [_check_nonfinite(canary, t), _check_error_ratio(canary, t), _check_p99_budget(canary, t)]
    state = cumulative
    if control is not None:
        checks += [_check_error_vs_control(canary, control, t), _check_p99_vs_control(canary, control, t),
                   _check_score_drift(canary, control, t)]
        ctr_check, state = _check_ctr(canary, control, t, cumulative, step)
        checks.append(ctr_check)
    advisory = set(advisory)
    checks = [replace(c, advisory=True) if c.name in advisory else c for c in checks]
    return Analysis(phase=worst_phase(c.phase for c in checks if not c.advisory), checks=tuple(checks),
                    ctr_state=state)
