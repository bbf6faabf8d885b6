"""Rollout plans: the profiles are valid and fit their purpose, Param overrides apply and
refuse what they should, every kind of bad plan is refused with a message naming the
problem, and to_dict/from_dict round-trip through JSON."""

from __future__ import annotations

import json
import math

import pytest

from dayloop.errors import DayloopError
from dayloop.rollout.plan import (
    OVERRIDE_KEYS,
    PROFILES,
    THRESHOLD_KEYS,
    InvalidPlan,
    RolloutPlan,
    RolloutStep,
    from_dict,
    plan_from_params,
)

DEMO, PROD = PROFILES["demo"], PROFILES["prod"]
GOOD_THRESHOLDS = dict(DEMO.thresholds)


def _plan(steps=None, **kw) -> RolloutPlan:
    if steps is None:
        steps = (RolloutStep(50, 10, 5, 5, 20), RolloutStep(100, 10, 5, 5, 20))
    args = dict(name="t", steps=steps,
                analysis_interval_seconds=1, thresholds=GOOD_THRESHOLDS, drain_seconds=0,
                promote_grace_seconds=0)
    args.update(kw)
    return RolloutPlan(**args)


# ---------------------------------------------------------------- profiles

def test_prod_profile_ramps_slowly_over_hours_with_thousands_of_samples():
    assert [s.percent for s in PROD.steps] == [1, 5, 25, 50, 100]
    assert all(s.bake_seconds >= 3600 for s in PROD.steps)
    assert all(s.min_requests >= 1000 and s.min_impressions >= 1000 for s in PROD.steps)
    assert all(s.max_bake_seconds >= s.bake_seconds for s in PROD.steps)


def test_demo_profile_fits_in_a_few_minutes_and_its_minimums_are_reachable_at_20_rps():
    assert [s.percent for s in DEMO.steps] == [10, 50, 100]
    assert all(20 <= s.bake_seconds <= 60 for s in DEMO.steps)
    assert DEMO.max_duration_seconds() <= 5 * 60
    for s in DEMO.steps:
        expected_at_bake_end = 20 * s.percent / 100 * s.bake_seconds
        # reachable by the bake end, yet not so low that a starved step would pass
        assert 0.3 * expected_at_bake_end <= s.min_requests <= expected_at_bake_end
        assert 0.3 * expected_at_bake_end <= s.min_impressions <= expected_at_bake_end
    assert DEMO.analysis_interval_seconds < min(s.bake_seconds for s in DEMO.steps)


@pytest.mark.parametrize("plan", [DEMO, PROD], ids=["demo", "prod"])
def test_one_unlucky_error_at_the_minimum_sample_cannot_breach_the_error_budget(plan):
    for s in plan.steps:
        assert s.min_requests * plan.thresholds["max_error_ratio"] >= 2


def test_profile_thresholds_are_read_only():
    assert set(DEMO.thresholds) == set(THRESHOLD_KEYS)
    with pytest.raises(TypeError):
        DEMO.thresholds["alpha"] = 0.5  # type: ignore[index]
    assert PROFILES["demo"].thresholds["alpha"] == 0.05


def test_max_duration_sums_max_bakes_drains_and_grace():
    plan = _plan(drain_seconds=2, promote_grace_seconds=7)
    assert plan.max_duration_seconds() == 20 + 2 + 20 + 2 + 7


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("percents, match", [
    ((50, 50, 100), "strictly increase"),
    ((50, 25, 100), "strictly increase"),
    ((10, 50), "last step must be 100"),
    ((0, 100), r"\(0, 100\]"),
    ((-5, 100), r"\(0, 100\]"),
    ((50, 100.5), r"\(0, 100\]"),
    ((0.001, 100), "routes no user"),
    ((1.001, 1.002, 100), "same users"),
    ((1.5, 100), "whole bucket groups"),
])
def test_percents_must_increase_within_0_100_and_end_at_100(percents, match):
    with pytest.raises(InvalidPlan, match=match):
        _plan(steps=tuple(RolloutStep(p, 10, 5, 5, 20) for p in percents))


def test_one_bucket_group_is_the_smallest_step():
    plan = _plan(steps=(RolloutStep(1, 10, 5, 5, 20), RolloutStep(100, 10, 5, 5, 20)))
    assert plan.steps[0].percent == 1


@pytest.mark.parametrize("percent", [0.01, 0.5, 2.5, 50.3])
def test_a_step_must_own_whole_bucket_groups(percent):
    # The user-level CTR test takes its variance over bucket groups: a step that split a
    # group would put canary and control users in one unit.
    with pytest.raises(InvalidPlan, match="does not own whole bucket groups"):
        _plan(steps=(RolloutStep(percent, 10, 5, 5, 20), RolloutStep(100, 10, 5, 5, 20)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bake_seconds=0), "bake_seconds must be > 0"),
    (dict(bake_seconds=-1), "bake_seconds must be > 0"),
    (dict(bake_seconds=math.inf), "finite"),
    (dict(bake_seconds=math.nan), "finite"),
    (dict(max_bake_seconds=9), "max_bake_seconds .* must be >= bake_seconds"),
    (dict(min_requests=0), "min_requests must be at least 1"),
    (dict(min_impressions=-3), "min_impressions must be at least 1"),
    (dict(min_requests=2.5), "min_requests must be a whole number"),
    (dict(min_requests=True), "min_requests must be a number"),
    (dict(percent="50"), "percent must be a number"),
    (dict(bake_seconds=None), "bake_seconds must be a number"),
])
def test_bad_steps_are_refused_with_the_field_named(kwargs, match):
    args = dict(percent=50, bake_seconds=10, min_requests=5, min_impressions=5, max_bake_seconds=20)
    args.update(kwargs)
    with pytest.raises(InvalidPlan, match=match):
        RolloutStep(**args)


def test_step_numbers_are_normalised():
    s = RolloutStep(50, 10, 5.0, 5, 10)
    assert (s.percent, s.bake_seconds, s.max_bake_seconds) == (50.0, 10.0, 10.0)
    assert type(s.min_requests) is int and s.min_requests == 5
    assert s == RolloutStep(50.0, 10.0, 5, 5, 10.0)


@pytest.mark.parametrize("key, value", [
    ("max_error_ratio", -0.01), ("max_error_ratio", 1.0), ("max_error_ratio", 5),
    ("max_error_ratio_vs_control", -0.001), ("max_error_ratio_vs_control", 1.0),
    ("max_error_ratio_vs_control", 2.0),  # a factor typed where an absolute excess belongs
    ("p99_budget_s", 0), ("p99_budget_s", 250),  # 250: milliseconds typed for seconds
    ("p99_budget_s", 2.5),  # above the top latency bucket: unmeasurable
    ("max_p99_ratio_vs_control", 0.5),
    ("max_score_drift", 0), ("max_score_drift", 1.5),
    ("ctr_margin", 0), ("ctr_margin", 5), ("ctr_margin", 1.0),
    ("alpha", 0), ("alpha", 0.5), ("alpha", 5),
    ("alpha", math.nan), ("alpha", "0.05"), ("alpha", None), ("alpha", False),
])
def test_thresholds_out_of_range_are_refused(key, value):
    with pytest.raises(InvalidPlan, match=key):
        _plan(thresholds={**GOOD_THRESHOLDS, key: value})


@pytest.mark.parametrize("key, value", [
    ("max_error_ratio", 0.0), ("max_error_ratio_vs_control", 0.0), ("p99_budget_s", 2.0),
    ("max_score_drift", 1.0), ("ctr_margin", 0.2), ("alpha", 0.01),
])
def test_thresholds_at_their_inclusive_edges_are_accepted(key, value):
    assert _plan(thresholds={**GOOD_THRESHOLDS, key: value}).thresholds[key] == value


def test_threshold_keys_must_be_exactly_the_known_ones():
    with pytest.raises(InvalidPlan, match=r"unknown threshold key\(s\) \['max_eror_ratio'\]"):
        _plan(thresholds={**GOOD_THRESHOLDS, "max_eror_ratio": 0.01})
    partial = dict(GOOD_THRESHOLDS)
    del partial["ctr_margin"]
    with pytest.raises(InvalidPlan, match="missing.*ctr_margin"):
        _plan(thresholds=partial)
    with pytest.raises(InvalidPlan, match="mapping"):
        _plan(thresholds=[("alpha", 0.05)])


@pytest.mark.parametrize("kwargs, match", [
    (dict(name=""), "name"),
    (dict(name=None), "name"),
    (dict(steps=()), "at least one step"),
    (dict(steps="10,100"), "sequence"),
    (dict(steps=({"percent": 100},)), "RolloutStep"),
    (dict(analysis_interval_seconds=0), "analysis_interval_seconds must be > 0"),
    (dict(analysis_interval_seconds=math.inf), "finite"),
    (dict(drain_seconds=-1), "drain_seconds"),
    (dict(promote_grace_seconds=-1), "promote_grace_seconds"),
])
def test_bad_plan_fields_are_refused(kwargs, match):
    with pytest.raises(InvalidPlan, match=match):
        _plan(**kwargs)


def test_invalid_plan_is_both_a_value_error_and_a_dayloop_error():
    with pytest.raises(ValueError) as info:
        plan_from_params("demo", {"nope": 1})
    assert isinstance(info.value, DayloopError)


# ---------------------------------------------------------------- Params overrides

def test_no_or_empty_overrides_give_the_profile():
    assert plan_from_params("demo") is DEMO
    assert plan_from_params("prod", None) is PROD
    assert plan_from_params("demo", {}) is DEMO


def test_unknown_profile_is_refused():
    with pytest.raises(InvalidPlan, match="unknown rollout profile 'staging'.*demo.*prod"):
        plan_from_params("staging")


@pytest.mark.parametrize("key", ["step", "bake", "analysis_interval_seconds", "drain_seconds", "name", "thresholds"])
def test_override_keys_outside_the_allowed_set_are_refused_by_name(key):
    with pytest.raises(InvalidPlan, match=f"unknown rollout override key.*'{key}'"):
        plan_from_params("demo", {key: 1, "alpha": 0.01})


def test_every_allowed_override_key_is_accepted():
    values = {"steps": [20, 100], "bake_seconds": 12, "min_requests": 7, "min_impressions": 8,
              "max_bake_seconds": 30, "max_error_ratio": 0.02, "max_error_ratio_vs_control": 0.01,
              "p99_budget_s": 0.1, "max_p99_ratio_vs_control": 2, "max_score_drift": 0.3,
              "ctr_margin": 0.1, "alpha": 0.1}
    assert set(values) == set(OVERRIDE_KEYS)
    plan = plan_from_params("demo", values)
    assert [s.percent for s in plan.steps] == [20, 100]
    assert all((s.bake_seconds, s.min_requests, s.min_impressions, s.max_bake_seconds) == (12, 7, 8, 30)
               for s in plan.steps)
    assert dict(plan.thresholds) == {k: float(values[k]) for k in THRESHOLD_KEYS}
    assert plan.name == "demo+overrides"
    # what the Params cannot change stays the profile's
    assert (plan.analysis_interval_seconds, plan.drain_seconds, plan.promote_grace_seconds) == (
        DEMO.analysis_interval_seconds, DEMO.drain_seconds, DEMO.promote_grace_seconds)


def test_threshold_override_alone_keeps_the_profile_ramp():
    plan = plan_from_params("prod", {"ctr_margin": 0.04})
    assert plan.steps == PROD.steps
    assert plan.thresholds["ctr_margin"] == 0.04
    assert {k: v for k, v in plan.thresholds.items() if k != "ctr_margin"} == {
        k: v for k, v in PROD.thresholds.items() if k != "ctr_margin"}
    assert PROD.thresholds["ctr_margin"] == 0.02  # the profile itself is untouched


def test_new_steps_inherit_settings_of_the_first_profile_step_at_or_above_them():
    plan = plan_from_params("prod", {"steps": [2, 25, 60, 100]})
    by_percent = {s.percent: s for s in PROD.steps}
    def settings(step):
        return {k: v for k, v in step.to_dict().items() if k != "percent"}
    assert [s.percent for s in plan.steps] == [2, 25, 60, 100]
    assert [settings(s) for s in plan.steps] == [settings(by_percent[p]) for p in (5, 25, 100, 100)]


def test_bake_override_scales_max_bake_with_the_profile_ratio():
    plan = plan_from_params("demo", {"bake_seconds": [10, 20, 40]})
    assert [s.bake_seconds for s in plan.steps] == [10, 20, 40]
    assert [s.max_bake_seconds / s.bake_seconds for s in plan.steps] == [
        s.max_bake_seconds / s.bake_seconds for s in DEMO.steps]
    # an explicit max bake wins, and is checked against the bake
    with pytest.raises(InvalidPlan, match="max_bake_seconds"):
        plan_from_params("demo", {"bake_seconds": 60, "max_bake_seconds": 30})


@pytest.mark.parametrize("overrides, match", [
    ("steps=10,100", "JSON object"),
    ([("alpha", 0.1)], "JSON object"),
    ({"steps": "10,100"}, "list of percents"),
    ({"steps": []}, "at least one percent"),
    ({"steps": [10, "50", 100]}, "must be a number"),
    ({"steps": [10, 50]}, "last step must be 100"),
    ({"steps": [50, 10, 100]}, "strictly increase"),
    ({"steps": [10, 100], "bake_seconds": [30, 30, 30]}, "lists 3 values for 2 steps"),
    ({"bake_seconds": "30"}, "number or a list"),
    ({"bake_seconds": None}, "number or a list"),
    ({"bake_seconds": {"10": 5}}, "number or a list"),
    ({"bake_seconds": 0}, "bake_seconds must be > 0"),
    ({"bake_seconds": [30, -1, 30]}, "bake_seconds must be > 0"),
    ({"min_requests": 0}, "min_requests must be at least 1"),
    ({"min_impressions": 12.5}, "whole number"),
    ({"max_bake_seconds": 1}, "max_bake_seconds"),
    ({"alpha": 0.7}, "alpha"),
    ({"p99_budget_s": "0.2"}, "p99_budget_s must be a number"),
])
def test_bad_overrides_are_refused_with_a_clear_reason(overrides, match):
    with pytest.raises(InvalidPlan, match=match):
        plan_from_params("demo", overrides)


def test_json_numbers_from_a_form_are_accepted():
    plan = plan_from_params("demo", json.loads('{"steps": [25, 100.0], "min_requests": 100.0, "bake_seconds": 30}'))
    assert [s.percent for s in plan.steps] == [25.0, 100.0]
    assert all(type(s.min_requests) is int and s.min_requests == 100 for s in plan.steps)


# ---------------------------------------------------------------- dict round trip

@pytest.mark.parametrize("plan", [DEMO, PROD, plan_from_params("demo", {"steps": [1, 100], "alpha": 0.01})],
                         ids=["demo", "prod", "overridden"])
def test_to_dict_round_trips_through_json(plan):
    data = json.loads(json.dumps(plan.to_dict()))
    assert from_dict(data) == plan
    assert from_dict(data).to_dict() == plan.to_dict()


def test_from_dict_revalidates_and_refuses_unknown_or_missing_keys():
    good = DEMO.to_dict()
    with pytest.raises(InvalidPlan, match=r"unknown plan key\(s\) \['extra'\]"):
        from_dict({**good, "extra": 1})
    with pytest.raises(InvalidPlan, match="missing.*drain_seconds"):
        from_dict({k: v for k, v in good.items() if k != "drain_seconds"})
    with pytest.raises(InvalidPlan, match=r"step 1: unknown key\(s\) \['pct'\]"):
        from_dict({**good, "steps": [good["steps"][0], {**good["steps"][1], "pct": 3}, good["steps"][2]]})
    with pytest.raises(InvalidPlan, match=r"step 0: .*missing key\(s\) \['bake_seconds'\]"):
        from_dict({**good, "steps": [{k: v for k, v in good["steps"][0].items() if k != "bake_seconds"},
                                     *good["steps"][1:]]})
    with pytest.raises(InvalidPlan, match="step 0 must be a mapping"):
        from_dict({**good, "steps": [10, 100]})
    with pytest.raises(InvalidPlan, match="steps must be a list"):
        from_dict({**good, "steps": {"percent": 100}})
    with pytest.raises(InvalidPlan, match="a plan must be a mapping"):
        from_dict(json.dumps(good))
    tampered = json.loads(json.dumps(good))
    tampered["steps"][-1]["percent"] = 90
    with pytest.raises(InvalidPlan, match="last step must be 100"):
        from_dict(tampered)
    tampered = json.loads(json.dumps(good))
    tampered["thresholds"]["alpha"] = 2
    with pytest.raises(InvalidPlan, match="alpha"):
        from_dict(tampered)
