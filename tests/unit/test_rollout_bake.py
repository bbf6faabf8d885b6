"""The bake's pure parts: step decisions, thresholds per step, route ownership, the outcome
of a run, alert delivery, and rollback-request validation before any I/O."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dayloop.rollout import bake, controller
from dayloop.rollout.plan import PROFILES, RolloutStep, plan_from_params

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


def test_route_ownership_needs_our_salt_and_our_canary():
    ctx = {"salt": "v5-ab", "version": 5}
    ours = {"table": {"salt": "v5-ab", "stable": 4, "routes": [{"start": 0, "end": 1000, "version": 5},
                                                                {"start": 1000, "end": 10000, "version": 4}]}}
    assert bake.rollout_owns_routes(ours, ctx)
    taken = {"table": {"salt": "v3-manual-1", "stable": 3, "routes": [{"start": 0, "end": 10000, "version": 3}]}}
    assert not bake.rollout_owns_routes(taken, ctx)
    same_salt_no_canary = {"table": {"salt": "v5-ab", "stable": 4, "routes": [{"start": 0, "end": 10000, "version": 4}]}}
    assert not bake.rollout_owns_routes(same_salt_no_canary, ctx)
    assert not bake.rollout_owns_routes({"table": None}, ctx)


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
    out = controller.finish_rollout(None, {"version": ctx["version"]}, ctx, steps, promoted, rolled_back, tmp_path)
    assert out["outcome"] == outcome


def test_finish_is_red_unless_promoted(tmp_path):
    with pytest.raises(controller.RolloutFailed, match="failed"):
        controller.finish_rollout(None, {"version": 3}, None, None, None, None, tmp_path)
    ctx = {"mode": "canary", "version": 3}
    with pytest.raises(controller.RolloutFailed, match="aborted: step 0 .* taken over"):
        controller.finish_rollout(None, {"version": 3}, ctx, _steps("aborted"), None,
                                  {"rolled_back": True, "reason": "x"}, tmp_path)
    with pytest.raises(controller.RolloutFailed, match="rolled back: nonfinite"):
        controller.finish_rollout(None, {"version": 3}, ctx, None, None,
                                  {"rolled_back": True, "reason": "nonfinite: 3 NaN"}, tmp_path)


def test_step_failure_reason():
    assert controller.step_failure_reason(_steps("aborted")[0]).startswith("step 0 (10%) aborted: route table")
    rec = {"index": 1, "percent": 50.0, "decision": "fail", "result": {"reasons": ["a: 1", "b: 2"]}}
    assert controller.step_failure_reason(rec) == "step 1 (50%) failed: a: 1; b: 2"


def test_alerts_are_posted_to_the_webhook_and_never_raise():
    from dayloop.airflow.notifier import send_alert

    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert send_alert({"text": "v3 rolled back", "version": 3}, url)
        assert got == [{"text": "v3 rolled back", "version": 3}]
    finally:
        server.shutdown()
        server.server_close()
    assert send_alert({"text": "log only"}, None)
    assert not send_alert({"text": "nobody listens"}, url, timeout_s=1.0)  # logged, not raised


def test_rollback_requests_are_refused_before_any_lookup():
    from dayloop.config import Settings
    from dayloop.rollout.manual import RollbackRefused, plan_rollback

    settings = Settings(home=None, data_cache=None)  # type: ignore[arg-type]
    for kwargs, message in (
        (dict(model="other", target="previous", reason="a good reason"), "unknown model"),
        (dict(model=None, target="previous", reason="   "), "reason"),
        (dict(model=None, target="previous", reason=None), "reason"),
        (dict(model=None, target="v3", reason="a good reason"), "target version"),
        (dict(model=None, target="-1", reason="a good reason"), "target version"),
        (dict(model=None, target="1; drop", reason="a good reason"), "target version"),
    ):
        with pytest.raises(RollbackRefused, match=message):
            plan_rollback(settings, client=None, **kwargs)


def test_the_profiles_are_what_the_dag_offers():
    assert set(PROFILES) == {"prod", "demo"}


def test_look_results_are_plain_python_for_the_triggerer():
    """The triggerer msgpack-encodes events and refuses numpy scalars."""
    import numpy as np

    out = bake.plain({"a": np.float64(0.5), "b": [np.int64(3), {"c": np.float32(1.5)}], "d": (1, "x"),
                      "e": None, "f": float("nan")})
    assert out["a"] == 0.5 and type(out["a"]) is float and type(out["b"][0]) is int
    assert type(out["b"][1]["c"]) is float and out["d"] == [1, "x"]

    def types(v):
        if isinstance(v, dict):
            return set().union(*(types(x) for x in v.values()))
        if isinstance(v, list):
            return set().union(set(), *(types(x) for x in v))
        return {type(v).__module__}

    assert types(out) == {"builtins"}


# --------------------------------------------------------------------------- retire_previous


def _promoted(ago_s: float) -> dict:
    at = bake.now_utc() - __import__("datetime").timedelta(seconds=ago_s)
    return {"promoted": True, "version": 7, "previous": 6, "revision": 12, "promoted_at": at.isoformat()}


def test_the_old_champion_is_due_for_retirement_one_grace_period_after_promotion():
    import datetime as dt

    plan = plan_from_params("prod")
    ctx = {"plan": plan.to_dict(), "plane_file": "unused"}
    promoted = _promoted(0)
    due = dt.datetime.fromisoformat(controller.retire_due(ctx, promoted))
    assert due - dt.datetime.fromisoformat(promoted["promoted_at"]) == dt.timedelta(seconds=plan.promote_grace_seconds)
    # Nothing to retire: no promotion, or a bootstrap with no previous champion.
    assert controller.retire_due(ctx, None) is None
    assert controller.retire_due(ctx, {"promoted": False}) is None
    assert controller.retire_due(ctx, {**promoted, "previous": None}) is None


def test_retire_previous_waits_in_the_triggerer_not_on_a_worker(monkeypatch):
    """Within the grace period the operator defers to a DateTimeTrigger at the due moment;
    after it (a retry, a late start) it retires at once."""
    import datetime as dt

    from airflow.providers.standard.triggers.temporal import DateTimeTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from dayloop.airflow import tasks
    from dayloop.airflow.operators import RetirePreviousOperator
    from dayloop.airflow.triggers import RESUME_HOLD_S

    calls = []
    monkeypatch.setattr(tasks, "retire_previous", lambda ctx, promoted: calls.append(promoted) or {"retired": 6})
    ctx = {"plan": plan_from_params("demo").to_dict(), "plane_file": "unused"}

    fresh = _promoted(1)
    prod = {"plan": plan_from_params("prod").to_dict(), "plane_file": "unused"}
    op = RetirePreviousOperator(task_id="retire_previous", rollout=prod, promoted=fresh)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DateTimeTrigger) and deferred.value.method_name == "retire"
    assert trigger.moment == dt.datetime.fromisoformat(controller.retire_due(prod, fresh))
    # A grace shorter than the resume hold waits for the hold (see triggers.RESUME_HOLD_S).
    op = RetirePreviousOperator(task_id="retire_previous", rollout=ctx, promoted=fresh)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    held = (deferred.value.trigger.moment - bake.now_utc()).total_seconds()
    assert RESUME_HOLD_S - 2 < held <= RESUME_HOLD_S
    assert calls == []
    assert op.retire({}, event=None) == {"retired": 6} and calls == [fresh]

    late = _promoted(3600)
    op = RetirePreviousOperator(task_id="retire_previous", rollout=ctx, promoted=late)
    assert op.execute({}) == {"retired": 6} and calls[-1] is late
    # Nothing promoted: nothing to do, and no deferral.
    op = RetirePreviousOperator(task_id="retire_previous", rollout=ctx, promoted={"promoted": False})
    assert op.execute({}) == {"retired": None}


def test_a_decision_is_held_until_the_deferral_has_settled():
    """BakeTrigger fires no sooner than RESUME_HOLD_S after its task deferred (an Airflow
    3.3 race fails a resumed task whose trigger fired too soon); a restarted trigger whose
    task deferred long ago fires at once."""
    import datetime as dt

    from dayloop.airflow.triggers import RESUME_HOLD_S, resume_hold_s

    now = bake.now_utc()
    assert resume_hold_s((now - dt.timedelta(seconds=5)).isoformat(), now) == pytest.approx(RESUME_HOLD_S - 5)
    assert resume_hold_s((now - dt.timedelta(seconds=RESUME_HOLD_S + 1)).isoformat(), now) == 0.0
    assert resume_hold_s(None, now) == 0.0  # triggers serialised before the hold existed


def test_the_bake_trigger_round_trips_its_deferral_time():
    from dayloop.airflow.triggers import BakeTrigger

    t = BakeTrigger(rollout={"plan": {}}, step_index=1, started_at="2026-11-24T00:00:00+00:00",
                    deferred_at="2026-11-24T00:00:01+00:00")
    path, kwargs = t.serialize()
    assert path == "dayloop.airflow.triggers.BakeTrigger"
    assert BakeTrigger(**kwargs).deferred_at == "2026-11-24T00:00:01+00:00"
