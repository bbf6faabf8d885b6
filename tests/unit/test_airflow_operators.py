"""The deferrable rollout operators and the bake trigger, without a scheduler: what they
defer to, when, and what they carry."""

from __future__ import annotations

import pytest

from dayloop.rollout import bake, controller
from dayloop.rollout.context import RolloutContext
from dayloop.rollout.plan import plan_from_params


def _promoted(ago_s: float) -> dict:
    at = bake.now_utc() - __import__("datetime").timedelta(seconds=ago_s)
    return {"promoted": True, "version": 7, "previous": 6, "revision": 12, "promoted_at": at.isoformat()}


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
    ctx = {"mode": "canary", "version": 7, "plan": plan_from_params("demo").to_dict(), "plane_file": "unused"}

    fresh = _promoted(1)
    prod = {"mode": "canary", "version": 7, "plan": plan_from_params("prod").to_dict(), "plane_file": "unused"}
    op = RetirePreviousOperator(task_id="retire_previous", rollout=prod, promoted=fresh)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DateTimeTrigger) and deferred.value.method_name == "retire"
    assert trigger.moment == dt.datetime.fromisoformat(controller.retire_due(RolloutContext.from_dict(prod), fresh))
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
