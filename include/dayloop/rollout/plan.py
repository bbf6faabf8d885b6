"""Rollout plans: the ramp (traffic steps), how long each step bakes, how many samples an
analysis needs before it may decide, and the thresholds it judges the canary by.

Two profiles: ``prod`` (hours per step, thousands of samples) and ``demo`` (tens of seconds
per step, sized for the simulator's ~20 requests/s, so a whole rollout fits in a few
minutes). A run may override parts of a profile from its Airflow Params
(:func:`plan_from_params`). Every plan is validated when it is built, so a typo in a Param
fails the run before any traffic moves, not halfway through a ramp.

Pure: no I/O. ``to_dict``/``from_dict`` give a JSON-safe form for XCom, MLflow tags and the
rollout report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dayloop.errors import DayloopError
from serving.routing import N_BUCKETS

# Upper bucket bound of the router's latency histogram (serving/router/metrics.py,
# LATENCY_BUCKETS): above it only +Inf remains, so a larger p99 budget could never be judged.
MAX_P99_BUDGET_S = 2.0

# name -> (low, high, low inclusive, high inclusive, meaning). Each range is what the
# threshold can sensibly mean; anything outside is a typo or a unit mix-up (ms for s, 5 for 5%).
THRESHOLD_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "max_error_ratio": (0.0, 1.0, True, False,
                        "highest tolerated canary error ratio (errors / requests)"),
    # An absolute excess, as dayloop.rollout.analysis reads it: a factor would be
    # meaningless against a control that had no error at all.
    "max_error_ratio_vs_control": (0.0, 1.0, True, False,
                                   "highest tolerated excess of canary error ratio over control's"),
    "p99_budget_s": (0.0, MAX_P99_BUDGET_S, False, True, "absolute p99 latency budget in seconds"),
    "max_p99_ratio_vs_control": (1.0, 100.0, True, True, "highest tolerated canary/control p99 factor"),
    "max_score_drift": (0.0, 1.0, False, True,
                        "highest tolerated PSI between canary and control top-1 score histograms"),
    "ctr_margin": (0.0, 1.0, False, False,
                   "tolerated relative CTR drop of canary vs control (0.05 = 5%)"),
    "alpha": (0.0, 0.5, False, False, "one-sided false-rollback rate of the sequential CTR test"),
}
THRESHOLD_KEYS = tuple(THRESHOLD_RANGES)
STEP_KEYS = ("percent", "bake_seconds", "min_requests", "min_impressions", "max_bake_seconds")
PER_STEP_OVERRIDES = ("bake_seconds", "min_requests", "min_impressions", "max_bake_seconds")
OVERRIDE_KEYS = ("steps", *PER_STEP_OVERRIDES, *THRESHOLD_KEYS)
PLAN_KEYS = ("name", "steps", "analysis_interval_seconds", "thresholds", "drain_seconds",
             "promote_grace_seconds")


class InvalidPlan(DayloopError, ValueError):
    """A rollout plan or override that must not be used (says which field and why)."""


def _number(value: Any, what: str) -> float:
    # bool is an int in Python; true/false in a Param is a mistake, not 1/0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidPlan(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidPlan(f"{what} must be finite, got {value!r}")
    return float(value)


def _count(value: Any, what: str) -> int:
    # JSON has one number type, so 2000.0 from a form is accepted as 2000; 2000.5 is not.
    v = _number(value, what)
    if not v.is_integer():
        raise InvalidPlan(f"{what} must be a whole number, got {value!r}")
    if v < 1:
        raise InvalidPlan(f"{what} must be at least 1 (zero would let an empty window decide), "
                          f"got {value!r}")
    return int(v)


@dataclass(frozen=True)
class RolloutStep:
    """One ramp step: route ``percent`` of users to the canary, bake, analyse.

    The analysis may decide once ``bake_seconds`` have passed since the step began and both
    minimum sample counts are met on the canary; while it is inconclusive the step keeps
    baking, up to ``max_bake_seconds``, after which the rollout fails safe."""

    percent: float
    bake_seconds: float
    min_requests: int
    min_impressions: int
    max_bake_seconds: float

    def __post_init__(self) -> None:
        where = f"step at {self.percent!r}%"
        percent = _number(self.percent, f"{where}: percent")
        if not 0 < percent <= 100:
            raise InvalidPlan(f"{where}: percent must be in (0, 100], got {self.percent!r}")
        if round(percent * N_BUCKETS / 100) < 1:
            raise InvalidPlan(f"{where}: percent {self.percent!r} routes no user "
                              f"(the route table has {N_BUCKETS} buckets, 1 bucket = {100 / N_BUCKETS}%)")
        bake = _number(self.bake_seconds, f"{where}: bake_seconds")
        if bake <= 0:
            raise InvalidPlan(f"{where}: bake_seconds must be > 0, got {self.bake_seconds!r}")
        max_bake = _number(self.max_bake_seconds, f"{where}: max_bake_seconds")
        if max_bake < bake:
            raise InvalidPlan(f"{where}: max_bake_seconds ({self.max_bake_seconds!r}) must be >= "
                              f"bake_seconds ({self.bake_seconds!r})")
        # Normalised types, so equality and to_dict do not depend on int-vs-float input.
        object.__setattr__(self, "percent", percent)
        object.__setattr__(self, "bake_seconds", bake)
        object.__setattr__(self, "max_bake_seconds", max_bake)
        object.__setattr__(self, "min_requests", _count(self.min_requests, f"{where}: min_requests"))
        object.__setattr__(self, "min_impressions",
                           _count(self.min_impressions, f"{where}: min_impressions"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form of this step."""
        return {k: getattr(self, k) for k in STEP_KEYS}


def _check_thresholds(thresholds: Any) -> Mapping[str, float]:
    if not isinstance(thresholds, Mapping):
        raise InvalidPlan(f"thresholds must be a mapping, got {type(thresholds).__name__}")
    unknown = sorted(set(thresholds) - set(THRESHOLD_KEYS), key=str)
    if unknown:
        raise InvalidPlan(f"unknown threshold key(s) {unknown}; known: {list(THRESHOLD_KEYS)}")
    missing = [k for k in THRESHOLD_KEYS if k not in thresholds]
    if missing:
        raise InvalidPlan(f"threshold(s) missing: {missing}")
    out = {}
    for key, (lo, hi, lo_in, hi_in, meaning) in THRESHOLD_RANGES.items():
        v = _number(thresholds[key], f"threshold {key}")
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise InvalidPlan(f"threshold {key} ({meaning}) must be in {interval}, got {thresholds[key]!r}")
        out[key] = v
    # Read-only: the profiles are module-level and shared by every run in the process.
    return MappingProxyType(out)


@dataclass(frozen=True)
class RolloutPlan:
    """A validated ramp: steps with strictly increasing percents ending at 100, how often the
    analysis looks (``analysis_interval_seconds``), its thresholds, how long to let
    in-flight requests settle after a route change before a step's window starts
    (``drain_seconds``), and how long to keep watching after promotion before the old
    version is retired (``promote_grace_seconds``)."""

    name: str
    steps: tuple[RolloutStep, ...]
    analysis_interval_seconds: float
    thresholds: Mapping[str, float] = field(hash=False)
    drain_seconds: float
    promote_grace_seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidPlan(f"plan name must be a non-empty string, got {self.name!r}")
        steps = self.steps
        if isinstance(steps, (str, bytes)) or not isinstance(steps, (tuple, list)):
            raise InvalidPlan(f"steps must be a sequence of RolloutStep, got {type(steps).__name__}")
        if not steps:
            raise InvalidPlan("a plan needs at least one step")
        for s in steps:
            if not isinstance(s, RolloutStep):
                raise InvalidPlan(f"steps must be RolloutStep objects, got {type(s).__name__}")
        for prev, cur in itertools.pairwise(steps):
            if cur.percent <= prev.percent:
                raise InvalidPlan("step percents must strictly increase, got "
                                  f"{[s.percent for s in steps]}")
            # Two percents that land on the same route-table bucket are the same step.
            if round(cur.percent * N_BUCKETS / 100) == round(prev.percent * N_BUCKETS / 100):
                raise InvalidPlan(f"steps {prev.percent}% and {cur.percent}% route the same users "
                                  f"(1 bucket = {100 / N_BUCKETS}%)")
        if steps[-1].percent != 100.0:
            raise InvalidPlan(f"the last step must be 100%, got {steps[-1].percent}%")
        interval = _number(self.analysis_interval_seconds, "analysis_interval_seconds")
        if interval <= 0:
            raise InvalidPlan(f"analysis_interval_seconds must be > 0, got {self.analysis_interval_seconds!r}")
        drain = _number(self.drain_seconds, "drain_seconds")
        grace = _number(self.promote_grace_seconds, "promote_grace_seconds")
        if drain < 0 or grace < 0:
            raise InvalidPlan(f"drain_seconds and promote_grace_seconds must be >= 0, got {drain}, {grace}")
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "analysis_interval_seconds", interval)
        object.__setattr__(self, "drain_seconds", drain)
        object.__setattr__(self, "promote_grace_seconds", grace)
        object.__setattr__(self, "thresholds", _check_thresholds(self.thresholds))

    def max_duration_seconds(self) -> float:
        """Longest time the plan may take: every step at its max bake, plus drains and grace."""
        return (sum(s.max_bake_seconds + self.drain_seconds for s in self.steps)
                + self.promote_grace_seconds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (plain dicts, lists, floats and ints); :func:`from_dict` inverts it."""
        return {
            "name": self.name,
            "steps": [s.to_dict() for s in self.steps],
            "analysis_interval_seconds": self.analysis_interval_seconds,
            "thresholds": dict(self.thresholds),
            "drain_seconds": self.drain_seconds,
            "promote_grace_seconds": self.promote_grace_seconds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPlan:
        """Rebuild (and re-validate) a plan from :meth:`to_dict`'s output; unknown keys are refused."""
        return from_dict(data)


def from_dict(data: Mapping[str, Any]) -> RolloutPlan:
    """Rebuild (and re-validate) a plan from ``RolloutPlan.to_dict()``; unknown or missing keys are refused."""
    if not isinstance(data, Mapping):
        raise InvalidPlan(f"a plan must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PLAN_KEYS), key=str)
    if unknown:
        raise InvalidPlan(f"unknown plan key(s) {unknown}; known: {list(PLAN_KEYS)}")
    missing = [k for k in PLAN_KEYS if k not in data]
    if missing:
        raise InvalidPlan(f"plan key(s) missing: {missing}")
    raw_steps = data["steps"]
    if isinstance(raw_steps, (str, bytes, Mapping)) or not isinstance(raw_steps, (list, tuple)):
        raise InvalidPlan(f"steps must be a list, got {type(raw_steps).__name__}")
    steps = []
    for i, s in enumerate(raw_steps):
        if not isinstance(s, Mapping):
            raise InvalidPlan(f"step {i} must be a mapping, got {type(s).__name__}")
        unknown = sorted(set(s) - set(STEP_KEYS), key=str)
        missing = [k for k in STEP_KEYS if k not in s]
        if unknown or missing:
            raise InvalidPlan(f"step {i}: unknown key(s) {unknown}, missing key(s) {missing}")
        steps.append(RolloutStep(**{k: s[k] for k in STEP_KEYS}))
    return RolloutPlan(name=data["name"], steps=tuple(steps),
                       analysis_interval_seconds=data["analysis_interval_seconds"],
                       thresholds=data["thresholds"], drain_seconds=data["drain_seconds"],
                       promote_grace_seconds=data["promote_grace_seconds"])


HOUR = 3600.0

# Guardrails of both profiles (the demo loosens one, below). The router's canary timeout
# is 0.25 s (slower attempts fail over to stable and count as errors), so the p99 budget
# sits below it to mean anything. PSI 0.25 is the usual "significant shift" line. A 2% CTR margin leaves the
# 5% and 10% drops the benchmarks measure clearly beyond it.
_THRESHOLDS = {
    "max_error_ratio": 0.01,
    "max_error_ratio_vs_control": 0.005,
    "p99_budget_s": 0.2,
    "max_p99_ratio_vs_control": 1.5,
    "max_score_drift": 0.25,
    "ctr_margin": 0.02,
    "alpha": 0.05,
}

PROFILES: dict[str, RolloutPlan] = {
    # Production: an hour or two per step, so daily and hourly traffic patterns show up in
    # the window; each step waits up to twice its bake for enough samples. Looks every 5
    # minutes (12-24 looks per step, which the sequential CTR test is built to survive).
    "prod": RolloutPlan(
        name="prod",
        steps=(
            RolloutStep(1.0, 1 * HOUR, 2_000, 2_000, 2 * HOUR),
            RolloutStep(5.0, 1 * HOUR, 10_000, 10_000, 2 * HOUR),
            RolloutStep(25.0, 2 * HOUR, 20_000, 20_000, 4 * HOUR),
            RolloutStep(50.0, 2 * HOUR, 50_000, 50_000, 4 * HOUR),
            RolloutStep(100.0, 1 * HOUR, 50_000, 50_000, 2 * HOUR),
        ),
        analysis_interval_seconds=300.0,
        thresholds=dict(_THRESHOLDS),
        drain_seconds=60.0,
        promote_grace_seconds=600.0,
    ),
    # Demo: the simulator sends ~20 requests/s, so a 10% step sees ~2 canary requests/s,
    # ~60 in its 30 s bake; the minimums ask for about two thirds of the expected count at
    # bake end, so an ordinary run decides on time and a starved one keeps baking. Worst
    # case (every step at max bake) is 2 x 105 s + drains + grace, under 4 minutes.
    "demo": RolloutPlan(
        name="demo",
        steps=(
            RolloutStep(10.0, 30.0, 40, 40, 60.0),
            RolloutStep(50.0, 40.0, 250, 250, 80.0),
            RolloutStep(100.0, 35.0, 400, 400, 70.0),
        ),
        analysis_interval_seconds=5.0,
        # 1% of a 40-request window is less than one error: at demo sizes the budget is 5%,
        # so at least two errors are needed to breach it (the demo's faults fail far harder).
        thresholds={**_THRESHOLDS, "max_error_ratio": 0.05},
        drain_seconds=3.0,
        promote_grace_seconds=10.0,
    ),
}


def _per_step(value: Any, n: int, key: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidPlan(f"override {key!r} lists {len(value)} values for {n} steps")
        return list(value)
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        raise InvalidPlan(f"override {key!r} must be a number or a list of numbers, got {value!r}")
    return [value] * n


def plan_from_params(profile: str, overrides: Mapping[str, Any] | None = None) -> RolloutPlan:
    """The named profile with a run's overrides applied (a JSON object from a trigger-form Param).

    Allowed keys: ``steps`` (list of percents), ``bake_seconds``, ``min_requests``,
    ``min_impressions``, ``max_bake_seconds`` (each a number for every step or a list with
    one value per step) and any threshold key. Anything else raises :class:`InvalidPlan`
    (a ValueError) naming the key.

    When ``steps`` changes the ramp, each new step inherits the per-step settings of the
    profile's first step at or above its percent (the profile ends at 100%, so one always
    exists). When ``bake_seconds`` is overridden but ``max_bake_seconds`` is not, each step
    keeps its profile ratio of max bake to bake, so a longer bake never trips max < bake.
    """
    if not isinstance(profile, str) or profile not in PROFILES:
        raise InvalidPlan(f"unknown rollout profile {profile!r}; known: {sorted(PROFILES)}")
    base = PROFILES[profile]
    if overrides is None:
        return base
    if not isinstance(overrides, Mapping):
        raise InvalidPlan(f"rollout overrides must be a JSON object, got {type(overrides).__name__}")
    unknown = sorted((k for k in overrides if k not in OVERRIDE_KEYS), key=str)
    if unknown:
        raise InvalidPlan(f"unknown rollout override key(s) {unknown}; allowed: {list(OVERRIDE_KEYS)}")
    if not overrides:
        return base

    if "steps" in overrides:
        percents = overrides["steps"]
        if isinstance(percents, (str, bytes, Mapping)) or not isinstance(percents, (list, tuple)):
            raise InvalidPlan(f"override 'steps' must be a list of percents, got {percents!r}")
        if not percents:
            raise InvalidPlan("override 'steps' must list at least one percent")
        percents = [_number(p, "override 'steps' percent") for p in percents]
        inherited = [next((s for s in base.steps if s.percent >= p), base.steps[-1]) for p in percents]
    else:
        inherited = list(base.steps)
        percents = [s.percent for s in inherited]
    n = len(percents)
    fields = {k: [getattr(s, k) for s in inherited] for k in PER_STEP_OVERRIDES}
    for key in PER_STEP_OVERRIDES:
        if key in overrides:
            fields[key] = _per_step(overrides[key], n, key)
    if "bake_seconds" in overrides and "max_bake_seconds" not in overrides:
        fields["max_bake_seconds"] = [
            _number(b, "override 'bake_seconds'") * (s.max_bake_seconds / s.bake_seconds)
            for b, s in zip(fields["bake_seconds"], inherited, strict=True)]
    steps = tuple(RolloutStep(percent=p, **{k: fields[k][i] for k in PER_STEP_OVERRIDES})
                  for i, p in enumerate(percents))
    thresholds = dict(base.thresholds)
    thresholds.update({k: overrides[k] for k in THRESHOLD_KEYS if k in overrides})
    return RolloutPlan(name=base.name if base.steps == steps and base.thresholds == thresholds
                       else f"{base.name}+overrides",
                       steps=steps, analysis_interval_seconds=base.analysis_interval_seconds,
                       thresholds=thresholds, drain_seconds=base.drain_seconds,
                       promote_grace_seconds=base.promote_grace_seconds)
