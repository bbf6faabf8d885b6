"""The bake trigger: runs in the triggerer while a canary step bakes (no worker slot held).

It looks at the step every ``analysis_interval_seconds`` (counted from the step's start,
not from when this trigger instance started, so a triggerer restart resumes the same
schedule) and fires one event when the step is decided: ``pass``, ``fail`` or ``aborted``.
Each look is one call of :func:`dayloop.rollout.bake.look` in a thread: it does blocking
HTTP (router admin, Prometheus) and numpy work that must not stall the triggerer's loop.

Kept light at import: the DAG file imports the operator, which imports this module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

MAX_LOOKS_KEPT = 60
# Between looks the trigger reads the routers' circuit breakers this often: a canary whose
# breaker trips (hard faults) is cut off by one route write from here, without waiting for
# the next look, the resume hold below or a worker slot.
BREAKER_POLL_S = 0.5
# The earliest an event may fire after its task deferred. Airflow 3.3 can fail a resumed
# deferred task when the trigger fires before the scheduler has drained the executor's
# "success" event for the deferring attempt (apache/airflow#66374, #67287, #72716: "reported
# that the task instance ... finished with state success, but the task instance's state
# attribute is queued"). That event was seen up to 6 s after deferral on 2 loaded cores.
# It cost one e2e run its step record and its rollback reason. Holding a decision until 15 s
# after deferral closes that window, at the price of at most 15 s on a fail-fast step.
RESUME_HOLD_S = 15.0


def resume_hold_s(deferred_at: str | None, now: dt.datetime) -> float:
    """Seconds still to wait before firing, for a task that deferred at ``deferred_at``."""
    if not deferred_at:
        return 0.0
    since = (now - dt.datetime.fromisoformat(deferred_at)).total_seconds()
    return max(0.0, RESUME_HOLD_S - since)


class BakeTrigger(BaseTrigger):
    """Bake one ramp step of a canary rollout and report its decision."""

    def __init__(self, rollout: dict[str, Any], step_index: int, started_at: str,
                 ctr_state: dict[str, Any] | None = None, deferred_at: str | None = None) -> None:
        super().__init__()
        self.rollout = rollout
        self.step_index = int(step_index)
        self.started_at = started_at
        self.ctr_state = ctr_state
        self.deferred_at = deferred_at

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("dayloop.airflow.triggers.BakeTrigger",
                {"rollout": self.rollout, "step_index": self.step_index, "started_at": self.started_at,
                 "ctr_state": self.ctr_state, "deferred_at": self.deferred_at})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from dayloop.jsonsafe import to_plain
        from dayloop.rollout import bake
        from dayloop.rollout.context import RolloutContext

        ctx = RolloutContext.from_dict(self.rollout)
        step = ctx.require_plan().steps[self.step_index]
        interval = ctx.require_plan().analysis_interval_seconds
        start = bake.parse_time(self.started_at)
        state = self.ctr_state
        looks: list[dict[str, Any]] = []
        k = 1
        self.log.info("baking step %d (%g%%) of v%s vs v%s since %s: bake %gs, max %gs, a look every %gs",
                      self.step_index, step.percent, ctx.version, ctx.champion,
                      self.started_at, step.bake_seconds, step.max_bake_seconds, interval)
        while True:
            now = bake.now_utc()
            # Resume the step's own look schedule (after a restart, the next due look).
            k = max(k, int((now - start).total_seconds() // interval) + 1)
            due = start + dt.timedelta(seconds=k * interval)
            trips = await self._watch(ctx, bake, due)
            k += 1
            try:
                if trips:
                    result = await asyncio.to_thread(bake.cut_off, ctx, self.step_index, self.started_at, trips)
                else:
                    result = await asyncio.to_thread(bake.look, ctx, self.step_index, self.started_at, state)
            except Exception as exc:  # noqa: BLE001 - an unexpected error is one inconclusive look
                elapsed = (bake.now_utc() - start).total_seconds()
                decision, why = bake.decide("inconclusive", elapsed, step)
                result = {"at": bake.now_utc().isoformat(timespec="seconds"), "step": self.step_index,
                          "percent": step.percent, "elapsed_s": round(elapsed, 1), "analysis": None,
                          "ctr_state": state, "decision": decision, "phase": "inconclusive",
                          "reasons": [r for r in (why, f"look failed: {type(exc).__name__}: {exc}") if r]}
            state = result.get("ctr_state", state)
            looks.append({k2: result[k2] for k2 in ("at", "elapsed_s", "phase", "decision")}
                         | {"reasons": result.get("reasons", [])[:6]})
            del looks[:-MAX_LOOKS_KEPT]
            line = bake.summary_line(result)
            if result["decision"] == bake.CONTINUE:
                self.log.info(line)
                continue
            (self.log.info if result["decision"] == bake.PASSED else self.log.warning)(line)
            hold = resume_hold_s(self.deferred_at, bake.now_utc())
            if hold > 0:
                self.log.info("decided; firing in %.1f s, once the deferral has settled in the scheduler", hold)
                await asyncio.sleep(hold)
            yield TriggerEvent(to_plain({"step": self.step_index, "decision": result["decision"],
                                           "started_at": self.started_at, "ended_at": result["at"],
                                           "result": result, "looks": looks, "ctr_state": state}))
            return

    async def _watch(self, ctx: Any, bake: Any, due: dt.datetime) -> list[str]:
        """Sleep until ``due``, reading the routers' breakers every BREAKER_POLL_S; the
        canary's trips as soon as there are any, else [] at ``due``."""
        while True:
            left = (due - bake.now_utc()).total_seconds()
            if left <= 0:
                return []
            await asyncio.sleep(min(BREAKER_POLL_S, left))
            trips = await asyncio.to_thread(bake.watch_breakers, ctx, self.started_at)
            if trips:
                self.log.warning("circuit breaker tripped on v%s: %s", ctx.version, "; ".join(trips))
                return trips
