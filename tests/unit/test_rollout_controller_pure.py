"""The rollout controller's pure parts: the plan a run resolves, the outcome of a run and
why a step failed, and when an old champion is due for retirement."""

from __future__ import annotations

import pytest

from dayloop.rollout import bake, controller
from dayloop.rollout.context import RolloutContext
from dayloop.rollout.plan import plan_from_params


def test_resolve_plan_uses_the_param_then_the_deployment_default(monkeypatch):
    monkeypatch.delenv(controller.DEFAULT_PROFILE_ENV, raising=False)
    assert controller.resolve_plan({}).name == "prod"
    monkeypatch.setenv(controller.DEFAULT_PROFILE_ENV, "demo")
    assert controller.resolve_plan(None).name == "demo"
    assert controller.resolve_plan({"rollout_profile": "prod"}).name == "prod"
    assert controller.resolve_plan({"rollout_overrides": {"bake_seconds": 5}}).steps[0].bake_seconds == 5
    with pytest.raises(ValueError, match="bake_secs"):
        controller.resolve_plan({"rollout_overrides": {"bake_secs": 5}})


def _steps(decision):
    return [{"index": 0, "percent": 10.0, "decision": decision,
             "result": {"reasons": ["route table taken over at revision 9 by manual_rollback/alice"]}}]


@pytest.mark.parametrize("ctx, steps, promoted, rolled_back, outcome", [
    ({"mode": "skipped", "version": 3, "reason": "deploy off"}, None, None, None, "not_deployed"),
    ({"mode": "champion", "version": 1}, None, None, None, "serving"),
])
def test_finish_without_a_canary_is_green(ctx, steps, promoted, rolled_back, outcome, tmp_path):
    out = controller.report_rollout(None, {"version": ctx["version"]}, RolloutContext.from_dict(ctx), steps, promoted,
                                    rolled_back, tmp_path)
    assert out["outcome"] == outcome


def test_finish_is_red_unless_promoted(tmp_path):
    with pytest.raises(controller.RolloutFailed, match="failed"):
        controller.report_rollout(None, {"version": 3}, None, None, None, None, tmp_path)
    ctx = RolloutContext.from_dict({"mode": "canary", "version": 3})
    with pytest.raises(controller.RolloutFailed, match="aborted: step 0 .* taken over"):
        controller.report_rollout(None, {"version": 3}, ctx, _steps("aborted"), None,
                                  {"rolled_back": True, "reason": "x"}, tmp_path)
    with pytest.raises(controller.RolloutFailed, match="rolled back: nonfinite"):
        controller.report_rollout(None, {"version": 3}, ctx, None, None,
                                  {"rolled_back": True, "reason": "nonfinite: 3 NaN"}, tmp_path)


def test_step_failure_reason():
    assert controller.step_failure_reason(_steps("aborted")[0]).startswith("step 0 (10%) aborted: route table")
    rec = {"index": 1, "percent": 50.0, "decision": "fail", "result": {"reasons": ["a: 1", "b: 2"]}}
    assert controller.step_failure_reason(rec) == "step 1 (50%) failed: a: 1; b: 2"


def _promoted(ago_s: float) -> dict:
    at = bake.now_utc() - __import__("datetime").timedelta(seconds=ago_s)
    return {"promoted": True, "version": 7, "previous": 6, "revision": 12, "promoted_at": at.isoformat()}


def test_the_old_champion_is_due_for_retirement_one_grace_period_after_promotion():
    import datetime as dt

    plan = plan_from_params("prod")
    ctx = RolloutContext.from_dict({"mode": "canary", "version": 7, "plan": plan.to_dict(), "plane_file": "unused"})
    promoted = _promoted(0)
    due = dt.datetime.fromisoformat(controller.retire_due(ctx, promoted))
    assert due - dt.datetime.fromisoformat(promoted["promoted_at"]) == dt.timedelta(seconds=plan.promote_grace_seconds)
    # Nothing to retire: no promotion, or a bootstrap with no previous champion.
    assert controller.retire_due(ctx, None) is None
    assert controller.retire_due(ctx, {"promoted": False}) is None
    assert controller.retire_due(ctx, {**promoted, "previous": None}) is None
