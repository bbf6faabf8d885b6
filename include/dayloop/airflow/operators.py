"""Deferrable rollout operators.

:class:`BakeAndRampOperator` walks the rollout plan's steps, deferring each bake to the
triggerer (:class:`~dayloop.airflow.triggers.BakeTrigger`).
:class:`RetirePreviousOperator` waits out the promotion grace period in the triggerer, then
unloads the old champion.

Between bakes it wakes on a worker only to record the step's verdict and route the next
step (one call each into :mod:`dayloop.rollout.controller`). A failed or aborted step ends
the task failed (``AirflowFailException``: re-running a decided step would not change the
answer), which triggers the DAG's rollback task. Every step's record is pushed to XCom
under ``steps`` as it completes, so the rollback and the report see them even on failure.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import BaseOperator

# Time for one look past the max bake before the task itself is timed out.
DEFER_SLACK_S = 180


class BakeAndRampOperator(BaseOperator):
    """Bake every step of a canary rollout; ramp on pass, fail on fail (see module doc)."""

    template_fields = ("rollout",)
    ui_color = "#fde9b6"

    def __init__(self, *, rollout: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rollout = rollout

    def _context(self):
        from dayloop.rollout.context import context_or_none

        return context_or_none(self.rollout)

    def execute(self, context: Any) -> dict[str, Any]:
        ctx = self._context()
        if ctx is None or not ctx.is_canary:
            mode = ctx.mode.value if ctx else None
            self.log.info("nothing to bake: rollout mode %r", mode)
            return {"outcome": "not_needed", "mode": mode, "steps": []}
        context["ti"].xcom_push(key="steps", value=[])
        self._bake(ctx, 0, ctx.started_at, None, [])

    def _bake(self, ctx: Any, index: int, started_at: str, ctr_state: Any, steps: list) -> None:
        from dayloop.airflow.triggers import BakeTrigger

        step = ctx.require_plan().steps[index]
        self.defer(trigger=BakeTrigger(rollout=ctx.to_dict(), step_index=index, started_at=started_at,
                                       ctr_state=ctr_state, deferred_at=dt.datetime.now(dt.timezone.utc).isoformat()),
                   method_name="step_done", kwargs={"steps": steps},
                   timeout=dt.timedelta(seconds=step.max_bake_seconds + DEFER_SLACK_S))

    def step_done(self, context: Any, event: dict[str, Any] | None = None, steps: list | None = None) -> dict:
        from dayloop.airflow import tasks

        ctx = self._context()
        plan = ctx.require_plan()
        steps = list(steps or [])
        index = int(event["step"])
        record = {"index": index, "percent": plan.steps[index].percent, **event}
        steps.append(record)
        context["ti"].xcom_push(key="steps", value=steps)
        tasks.record_step(ctx, record)
        if record["decision"] != "pass":
            tasks.stop_rollout(ctx, record)  # raises AirflowFailException with the reason
        if index + 1 < len(plan.steps):
            started = tasks.route_next_step(ctx, index + 1)
            self._bake(ctx, index + 1, started, event.get("ctr_state"), steps)
        return {"outcome": "passed", "steps": len(steps), "version": ctx.version}


class RetirePreviousOperator(BaseOperator):
    """After a promotion, keep the old champion loaded for the plan's grace period (a manual
    rollback to it then needs no reload), then unload it unless a route names it again.

    The wait is a deferral to a DateTimeTrigger, so no worker slot is held through the grace
    period (10 minutes in the prod profile); the moment is fixed at promotion time, so a
    restarted triggerer does not restart the wait."""

    template_fields = ("rollout", "promoted")
    ui_color = "#e3e3e3"

    def __init__(self, *, rollout: Any, promoted: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rollout = rollout
        self.promoted = promoted

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.providers.standard.triggers.temporal import DateTimeTrigger

        from dayloop.airflow import tasks

        due = tasks.retire_due(self.rollout, self.promoted)
        if due is None:
            self.log.info("nothing to retire: %r", self.promoted)
            return {"retired": None}
        from dayloop.airflow.triggers import RESUME_HOLD_S

        now = dt.datetime.now(dt.timezone.utc)
        moment = dt.datetime.fromisoformat(due)
        if moment > now:
            # Never sooner than the resume hold (see dayloop.airflow.triggers.RESUME_HOLD_S).
            moment = max(moment, now + dt.timedelta(seconds=RESUME_HOLD_S))
            self.log.info("v%s stays loaded until %s (promotion grace period until %s)", self.promoted["previous"],
                          moment.isoformat(timespec="seconds"), due)
            self.defer(trigger=DateTimeTrigger(moment=moment), method_name="retire")
        return self.retire(context)

    def retire(self, context: Any, event: Any = None) -> dict[str, Any]:
        from dayloop.airflow import tasks

        return tasks.retire_previous(self.rollout, self.promoted)
