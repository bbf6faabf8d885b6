"""Rollout plans: the ramp (traffic steps), how long each step bakes, how many samples an
analysis needs before it may decide, and the thresholds it judges the canary by.

Two profiles: ``prod`` (hours per step, thousands of samples) and ``demo`` (tens of seconds
per step, sized for the simulator's ~20 requests/s, so a whole rollout fits in a few
minutes). A run may override parts of a profile from its Airflow Params
(:func:`plan_from_params`). Every plan is validated when it is built, so a typo in a Param
fails the run before any traffic moves, not halfway through a ramp.

The models are frozen pydantic models: each field's limit is declared once, on the field
(``Field(gt=..., le=...)``), and read back from there when an error is explained. A
:class:`pydantic.ValidationError` never leaves this module: it becomes :class:`InvalidPlan`
with a message that names the bad key and value.

Pure: no I/O. ``to_dict``/``from_dict`` give a JSON-safe form for XCom, MLflow tags and the
rollout report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dayloop.errors import DayloopError
from serving.router.buckets import LATENCY_BUCKETS
from serving.routing import N_BUCKETS, N_GROUPS

# The router latency histogram's top finite bound: above it only +Inf remains, so a larger
# p99 budget could never be judged.
MAX_P99_BUDGET_S = LATENCY_BUCKETS[-1]


class InvalidPlan(DayloopError, ValueError):
    """A rollout plan or override that must not be used (says which field and why)."""


# --------------------------------------------------------------------------- field types


def _as_number(value: Any) -> float:
    # bool is an int in Python; true/false in a Param is a mistake, not 1/0. Strings are
    # refused rather than parsed: "0.2" in a Param is a form that lost its type.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("not_a_number", "must be a number")
    if not math.isfinite(value):
        raise PydanticCustomError("not_finite", "must be finite")
    return float(value)


def _as_count(value: Any) -> int:
    # JSON has one number type, so 2000.0 from a form is accepted as 2000; 2000.5 is not.
    number = _as_number(value)
    if not number.is_integer():
        raise PydanticCustomError("not_whole", "must be a whole number")
    return int(number)


Number = Annotated[float, BeforeValidator(_as_number)]
Count = Annotated[int, BeforeValidator(_as_count)]


# --------------------------------------------------------------------------- errors


def _bounds_text(model: type[BaseModel], name: str) -> str:
    """The field's declared limits, as ``in (0, 100]``, ``> 0`` or ``at least 1``."""
    lo = hi = None
    for meta in model.model_fields[name].metadata:
        for attr, side in (("gt", "("), ("ge", "[")):
            if getattr(meta, attr, None) is not None:
                lo = (side, getattr(meta, attr))
        for attr, side in (("lt", ")"), ("le", "]")):
            if getattr(meta, attr, None) is not None:
                hi = (side, getattr(meta, attr))
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"> {lo[1]:g}" if lo[0] == "(" else f"at least {lo[1]:g}"
    if hi:
        return f"< {hi[1]:g}" if hi[0] == ")" else f"at most {hi[1]:g}"
    return "valid"


def _explain(model: type[_PlanModel], exc: ValidationError, where: str) -> str:
    """One readable sentence for the first problem of ``exc`` (key problems first, all at once)."""
    errors = exc.errors()
    unknown = sorted((str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"), key=str)
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    prefix = f"{where}: " if where else ""
    noun = f"{model.noun} " if model.noun else ""
    if unknown or missing:
        parts = []
        if unknown:
            known = f"; known: {list(model.model_fields)}" if model.noun else ""
            parts.append(f"unknown {noun}key(s) {unknown}{known}")
        if missing:
            parts.append(f"missing {noun}key(s) {missing}")
        return prefix + ("; " if model.noun else ", ").join(parts)
    first = errors[0]
    if first["type"] == "value_error":
        cause = first.get("ctx", {}).get("error")
        # An InvalidPlan from a nested model already says everything, prefix included.
        return str(cause) if isinstance(cause, InvalidPlan) else prefix + str(cause)
    name = str(first["loc"][0]) if first["loc"] else ""
    label = f"{model.field_label}{name}"
    got = f", got {first['input']!r}"
    if first["type"] in ("not_a_number", "not_finite", "not_whole"):
        return f"{prefix}{label} {first['msg']}{got}"
    if first["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        meaning = model.model_fields[name].description if model.field_label else None
        about = f" ({meaning})" if meaning else ""
        return f"{prefix}{label}{about} must be {_bounds_text(model, name)}{got}"
    return f"{prefix}{label}: {first['msg']}{got}"


class _PlanModel(BaseModel):
    """Frozen, no unknown keys, positional arguments in field order (the profiles below and
    callers write ``RolloutStep(10.0, 30.0, 40, 40, 60.0)``), and InvalidPlan on any error."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    noun: ClassVar[str] = ""  # what key messages call a key of this model ("unknown plan key(s)")
    field_label: ClassVar[str] = ""  # put before a field's name in messages ("threshold alpha ...")

    def __init__(self, *args: Any, _where: str | None = None, **data: Any) -> None:
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise InvalidPlan(f"{type(self).__name__} takes at most {len(names)} values, got {len(args)}")
        data = {**dict(zip(names, args, strict=False)), **data}
        try:
            super().__init__(**data)
        except ValidationError as exc:
            where = type(self)._default_where(data) if _where is None else _where
            raise InvalidPlan(_explain(type(self), exc, where)) from None

    @classmethod
    def _default_where(cls, data: Mapping[str, Any]) -> str:
        return ""

    @classmethod
    def build(cls, data: Mapping[str, Any], where: str | None = None) -> Any:
        """Validate ``data`` (a mapping of field -> value) into this model; ``where`` names it
        in messages (default: the model's own wording)."""
        return cls(_where=where, **{str(k): v for k, v in data.items()})


# --------------------------------------------------------------------------- models


class RolloutStep(_PlanModel):
    """One ramp step: route ``percent`` of users to the canary, bake, analyse.

    The analysis may decide once ``bake_seconds`` have passed since the step began and both
    minimum sample counts are met on the canary; while it is inconclusive the step keeps
    baking, up to ``max_bake_seconds``, after which the rollout fails safe."""

    percent: Number = Field(gt=0, le=100, description="share of users routed to the canary, in percent")
    bake_seconds: Number = Field(gt=0, description="least time the step runs before it may pass")
    # At least 1: zero would let an empty window decide.
    min_requests: Count = Field(ge=1, description="canary requests the window needs before a check decides")
    min_impressions: Count = Field(ge=1, description="impressions per arm the CTR and score checks need")
    max_bake_seconds: Number = Field(description="longest the step may stay inconclusive before failing safe")

    @classmethod
    def _default_where(cls, data: Mapping[str, Any]) -> str:
        return f"step at {data.get('percent')!r}%"

    @field_validator("percent")
    @classmethod
    def _routes_someone(cls, percent: float) -> float:
        if round(percent * N_BUCKETS / 100) < 1:
            raise ValueError(f"percent {percent!r} routes no user "
                             f"(the route table has {N_BUCKETS} buckets, 1 bucket = {100 / N_BUCKETS}%)")
        return percent

    @model_validator(mode="after")
    def _max_bake_covers_bake(self) -> RolloutStep:
        if self.max_bake_seconds < self.bake_seconds:
            raise ValueError(f"max_bake_seconds ({self.max_bake_seconds!r}) must be >= "
                             f"bake_seconds ({self.bake_seconds!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form of this step."""
        return self.model_dump()


class PlanThresholds(_PlanModel):
    """The plan's analysis thresholds, each with the range it can sensibly mean: anything
    outside is a typo or a unit mix-up (ms for s, 5 for 5%). This is the one place these
    limits live: :class:`dayloop.rollout.analysis.Thresholds` checks its values against them.

    Read-only and a mapping (``plan.thresholds["p99_budget_s"]``, ``dict(plan.thresholds)``)."""

    noun: ClassVar[str] = "threshold"
    field_label: ClassVar[str] = "threshold "

    max_error_ratio: Number = Field(ge=0, lt=1, description="highest tolerated canary error ratio (errors / requests)")
    # An absolute excess, as dayloop.rollout.analysis reads it: a factor would be
    # meaningless against a control that had no error at all.
    max_error_ratio_vs_control: Number = Field(
        ge=0, lt=1, description="highest tolerated excess of canary error ratio over control's")
    p99_budget_s: Number = Field(gt=0, le=MAX_P99_BUDGET_S, description="absolute p99 latency budget in seconds")
    max_p99_ratio_vs_control: Number = Field(ge=1, le=100, description="highest tolerated canary/control p99 factor")
    max_score_drift: Number = Field(
        gt=0, le=1, description="highest tolerated PSI between canary and control top-1 score histograms")
    # [0, 1) is where the CTR test is defined (the analysis calibrates at 0); a plan also
    # refuses 0 itself, see RolloutPlan._plan_rules.
    ctr_margin: Number = Field(ge=0, lt=1, description="tolerated relative CTR drop of canary vs control (0.05 = 5%)")
    alpha: Number = Field(gt=0, lt=0.5, description="one-sided false-rollback rate of the sequential CTR test")

    # A mapping of name -> float, so callers keep reading it like the dict it replaced.
    def __getitem__(self, key: str) -> float:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # keys, as a Mapping iterates
        return iter(type(self).model_fields)

    def __len__(self) -> int:
        return len(type(self).model_fields)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def keys(self) -> Iterator[str]:
        return iter(self)

    def values(self) -> Iterator[float]:
        return (getattr(self, k) for k in self)

    def items(self) -> Iterator[tuple[str, float]]:
        return ((k, getattr(self, k)) for k in self)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


Mapping.register(PlanThresholds)

THRESHOLD_KEYS = tuple(PlanThresholds.model_fields)
STEP_KEYS = tuple(RolloutStep.model_fields)
PER_STEP_OVERRIDES = ("bake_seconds", "min_requests", "min_impressions", "max_bake_seconds")
OVERRIDE_KEYS = ("steps", *PER_STEP_OVERRIDES, *THRESHOLD_KEYS)


def _bucket(percent: float) -> int:
    return round(percent * N_BUCKETS / 100)


class RolloutPlan(_PlanModel):
    """A validated ramp: steps with strictly increasing percents ending at 100, how often the
    analysis looks (``analysis_interval_seconds``), its thresholds, how long to let
    in-flight requests settle after a route change before a step's window starts
    (``drain_seconds``), and how long to keep watching after promotion before the old
    version is retired (``promote_grace_seconds``)."""

    noun: ClassVar[str] = "plan"

    name: str = Field(description="profile name, '+overrides' when a run changed it")
    steps: tuple[RolloutStep, ...] = Field(description="the ramp, in order")
    analysis_interval_seconds: Number = Field(gt=0, description="time between two looks of the analysis")
    thresholds: PlanThresholds = Field(description="what the analysis judges the canary by")
    drain_seconds: Number = Field(ge=0, description="settling time after a route change, before a window starts")
    promote_grace_seconds: Number = Field(ge=0, description="time watched after promotion before retiring")

    @field_validator("name", mode="before")
    @classmethod
    def _named(cls, name: Any) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"plan name must be a non-empty string, got {name!r}")
        return name

    @field_validator("steps", mode="before")
    @classmethod
    def _step_objects(cls, steps: Any) -> tuple[RolloutStep, ...]:
        if isinstance(steps, str | bytes) or not isinstance(steps, tuple | list):
            raise ValueError(f"steps must be a sequence of RolloutStep, got {type(steps).__name__}")
        if not steps:
            raise ValueError("a plan needs at least one step")
        for s in steps:
            if not isinstance(s, RolloutStep):
                raise ValueError(f"steps must be RolloutStep objects, got {type(s).__name__}")
        return tuple(steps)

    @field_validator("thresholds", mode="before")
    @classmethod
    def _threshold_mapping(cls, thresholds: Any) -> PlanThresholds:
        if isinstance(thresholds, PlanThresholds):
            return thresholds
        if not isinstance(thresholds, Mapping):
            raise ValueError(f"thresholds must be a mapping, got {type(thresholds).__name__}")
        return PlanThresholds.build(thresholds)

    @model_validator(mode="after")
    def _plan_rules(self) -> RolloutPlan:
        for prev, cur in itertools.pairwise(self.steps):
            if cur.percent <= prev.percent:
                raise ValueError(f"step percents must strictly increase, got {[s.percent for s in self.steps]}")
            # Two percents that land on the same route-table bucket are the same step.
            if _bucket(cur.percent) == _bucket(prev.percent):
                raise ValueError(f"steps {prev.percent}% and {cur.percent}% route the same users "
                                 f"(1 bucket = {100 / N_BUCKETS}%)")
        if self.steps[-1].percent != 100.0:
            raise ValueError(f"the last step must be 100%, got {self.steps[-1].percent}%")
        # The CTR test's unit is the bucket group: a step must own whole groups, so that no
        # group holds canary and control users at once.
        per_group = 100 / N_GROUPS
        for s in self.steps:
            owned = s.percent / per_group
            if abs(owned - round(owned)) > 1e-9:
                raise ValueError(f"step {s.percent:g}% does not own whole bucket groups: steps must be "
                                 f"multiples of {per_group:g}% ({N_GROUPS} groups, the unit of the CTR test)")
        # A zero margin turns "not worse than control" into "not worse at all": at production
        # counts a negligible true CTR drop would roll the canary back.
        if not self.thresholds.ctr_margin > 0:
            raise ValueError(f"threshold ctr_margin of a plan must be in (0, 1), got {self.thresholds.ctr_margin!r}")
        return self

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


PLAN_KEYS = tuple(RolloutPlan.model_fields)


def from_dict(data: Mapping[str, Any]) -> RolloutPlan:
    """Rebuild (and re-validate) a plan from ``RolloutPlan.to_dict()``; unknown or missing keys are refused."""
    if not isinstance(data, Mapping):
        raise InvalidPlan(f"a plan must be a mapping, got {type(data).__name__}")
    raw_steps = data.get("steps")
    if "steps" in data:
        if isinstance(raw_steps, str | bytes | Mapping) or not isinstance(raw_steps, list | tuple):
            raise InvalidPlan(f"steps must be a list, got {type(raw_steps).__name__}")
        for i, s in enumerate(raw_steps):
            if not isinstance(s, Mapping):
                raise InvalidPlan(f"step {i} must be a mapping, got {type(s).__name__}")
        # Steps are named by index here: a step with a missing percent has nothing else to go by.
        data = {**data, "steps": tuple(RolloutStep.build(s, where=f"step {i}") for i, s in enumerate(raw_steps))}
    return RolloutPlan.build(data)


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
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise InvalidPlan(f"override {key!r} lists {len(value)} values for {n} steps")
        return list(value)
    if isinstance(value, str | bytes | Mapping) or value is None:
        raise InvalidPlan(f"override {key!r} must be a number or a list of numbers, got {value!r}")
    return [value] * n


def _override_number(value: Any, what: str) -> float:
    try:
        return _as_number(value)
    except PydanticCustomError as exc:
        raise InvalidPlan(f"{what} {exc.message()}, got {value!r}") from None


def _ramp_percents(base: RolloutPlan, overrides: Mapping[str, Any]) -> tuple[list[float], list[RolloutStep]]:
    """The overridden ramp's percents, and the profile step each one inherits its settings from."""
    if "steps" not in overrides:
        return [s.percent for s in base.steps], list(base.steps)
    percents = overrides["steps"]
    if isinstance(percents, str | bytes | Mapping) or not isinstance(percents, list | tuple):
        raise InvalidPlan(f"override 'steps' must be a list of percents, got {percents!r}")
    if not percents:
        raise InvalidPlan("override 'steps' must list at least one percent")
    percents = [_override_number(p, "override 'steps' percent") for p in percents]
    return percents, [next((s for s in base.steps if s.percent >= p), base.steps[-1]) for p in percents]


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

    percents, inherited = _ramp_percents(base, overrides)
    n = len(percents)
    fields = {k: [getattr(s, k) for s in inherited] for k in PER_STEP_OVERRIDES}
    for key in PER_STEP_OVERRIDES:
        if key in overrides:
            fields[key] = _per_step(overrides[key], n, key)
    if "bake_seconds" in overrides and "max_bake_seconds" not in overrides:
        fields["max_bake_seconds"] = [
            _override_number(b, "override 'bake_seconds'") * (s.max_bake_seconds / s.bake_seconds)
            for b, s in zip(fields["bake_seconds"], inherited, strict=True)]
    steps = tuple(RolloutStep(percent=p, **{k: fields[k][i] for k in PER_STEP_OVERRIDES})
                  for i, p in enumerate(percents))
    thresholds = {**base.thresholds, **{k: overrides[k] for k in THRESHOLD_KEYS if k in overrides}}
    return RolloutPlan(name=base.name if base.steps == steps and dict(base.thresholds) == thresholds
                       else f"{base.name}+overrides",
                       steps=steps, analysis_interval_seconds=base.analysis_interval_seconds,
                       thresholds=thresholds, drain_seconds=base.drain_seconds,
                       promote_grace_seconds=base.promote_grace_seconds)
