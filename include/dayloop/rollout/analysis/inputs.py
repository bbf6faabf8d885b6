"""The inputs of the canary analysis: what one version did over a step's window
(:class:`VersionWindow`, with its :class:`Histogram` buckets) and the limits it is judged by
(:class:`Thresholds`). Counts are ``increase()`` values from Prometheus, so they may be
fractional; ``None`` is a missing series and is never read as zero."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from typing import Any

import numpy as np

from dayloop.rollout.plan import THRESHOLD_KEYS, PlanThresholds


def monotone_cumulative(cumulative: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cumulative bucket counts forced non-decreasing (running maximum). ``increase()``
    extrapolates each bucket series on its own, so float noise can make a cumulative count
    dip below the previous one, which a histogram cannot do; Prometheus's
    ``histogram_quantile`` repairs it the same way. The one home of this repair: the
    analysis's :class:`Histogram` and the Prometheus reader (:mod:`dayloop.rollout.prom`)."""
    return np.maximum.accumulate(np.asarray(cumulative, dtype=np.float64))


def why_unusable(value: float | None) -> str | None:
    """Why a count cannot be used (absent, not a number, infinite, negative), or None when it can."""
    if value is None:
        return "series missing"
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return f"invalid value {value!r}"
    return None


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
        """Cumulative counts forced non-decreasing (see :func:`monotone_cumulative`)."""
        return monotone_cumulative(self.cumulative)

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
        # The thresholds a rollout plan sets are held to the plan's limits, declared once in
        # dayloop.rollout.plan (raises InvalidPlan, a ValueError, naming the key).
        PlanThresholds.build({k: getattr(self, k) for k in THRESHOLD_KEYS})
        # The rest exist only here: the drift test's level, and the CTR test's shape.
        if not 0 < self.drift_alpha < 1:
            raise ValueError(f"threshold drift_alpha must be in (0, 1), got {self.drift_alpha}")
        if self.ctr_mixture_scale <= 0:
            raise ValueError(f"threshold ctr_mixture_scale must be > 0, got {self.ctr_mixture_scale}")
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
