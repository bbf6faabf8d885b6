"""The bake's pure parts: step decisions, thresholds per step, times, the look's log line."""

from __future__ import annotations

import pytest

from dayloop.rollout import bake
from dayloop.rollout.plan import RolloutStep, plan_from_params

STEP = RolloutStep(percent=10.0, bake_seconds=30.0, min_requests=40, min_impressions=40, max_bake_seconds=60.0)


@pytest.mark.parametrize("phase, elapsed, expected", [
    ("fail", 1.0, "fail"),          # a failure ends the step at once, even early
    ("fail", 59.0, "fail"),
    ("pass", 10.0, "continue"),     # a pass counts only once baked
    ("pass", 30.0, "pass"),
    ("inconclusive", 30.0, "continue"),
    ("inconclusive", 60.0, "fail"),  # fails safe at max bake
    ("pass", 61.0, "pass"),
])
def test_decide(phase, elapsed, expected):
    decision, why = bake.decide(phase, elapsed, STEP)
    assert decision == expected
    assert (why is not None) == (phase == "inconclusive" and expected == "fail")


def test_fail_safe_says_why_with_numbers():
    _, why = bake.decide("inconclusive", 61.2, STEP)
    assert "61" in why and "max bake 60" in why and "inconclusive" in why and "failing safe" in why


def test_thresholds_for_step_carry_the_step_minimums_and_the_profile_mixture():
    demo = plan_from_params("demo")
    t = bake.thresholds_for_step(demo, demo.steps[1])
    assert t.min_requests == demo.steps[1].min_requests and t.min_impressions == demo.steps[1].min_impressions
    assert t.ctr_mixture_scale == bake.MIXTURE_SCALE["demo"]
    assert t.max_error_ratio == demo.thresholds["max_error_ratio"]
    prod = plan_from_params("prod", {"ctr_margin": 0.05})
    tp = bake.thresholds_for_step(prod, prod.steps[0])
    assert tp.ctr_mixture_scale == bake.MIXTURE_SCALE["prod"] and tp.ctr_margin == 0.05


def test_parse_time_reads_naive_as_utc():
    assert bake.parse_time("2026-11-23T10:00:00").utcoffset().total_seconds() == 0
    assert bake.parse_time("2026-11-23T10:00:00+01:00").utcoffset().total_seconds() == 3600


def test_summary_line_has_every_check():
    line = bake.summary_line({"step": 0, "percent": 10.0, "elapsed_s": 31.0, "decision": "fail", "phase": "fail",
                              "reasons": ["nonfinite: 3 NaN outputs"],
                              "analysis": {"checks": [{"name": "nonfinite", "phase": "fail",
                                                       "message": "3 NaN outputs"},
                                                      {"name": "ctr", "phase": "pass", "message": "p=0.4"}]}})
    assert "FAIL" in line and "nonfinite=fail: 3 NaN outputs" in line and "ctr=pass: p=0.4" in line
