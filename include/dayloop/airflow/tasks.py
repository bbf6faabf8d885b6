"""Entry points the DAG tasks call: one function per task.

Each reads the settings at run time, resolves endpoints from Airflow connections,
calls the matching stage in ``dayloop.pipeline`` and turns a decided "no" (a
failed gate, a date without data, a bad setting) into ``AirflowFailException``:
retrying would only repeat the same answer. Anything else (a registry that is
briefly unreachable, say) propagates and is retried by Airflow.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from dayloop import pipeline
from dayloop.config import ConfigError, load_settings, parse_day
from dayloop.errors import DayloopError

log = logging.getLogger("dayloop.airflow")
T = TypeVar("T")


def _decided(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (DayloopError, ConfigError) as exc:
            from airflow.sdk.exceptions import AirflowFailException

            reasons = getattr(exc, "reasons", None) or [str(exc)]
            for reason in reasons:
                log.error("%s: %s", fn.__name__, reason)
            raise AirflowFailException(str(exc)) from exc

    return wrapper


def _day(ds: str | None):
    if not ds:
        raise ConfigError("this DAG needs a logical date: trigger it with one (the form's Logical date)")
    return parse_day(ds)


def _context(value: Any):
    """The rollout context from its XCom dict (None when deploy_canary never pushed one); a
    context the bake operator already read is passed through, not parsed again."""
    from dayloop.rollout.context import context_or_none

    return context_or_none(value)


def _params(params: dict | None, mapping: dict[str, str]) -> dict[str, Any]:
    """Pick the Params that override a stage's settings, dropping the unset ones."""
    params = params or {}
    return {target: params[source] for source, target in mapping.items() if params.get(source) is not None}


@_decided
def land_partition(ds: str | None) -> dict:
    return pipeline.land_partition(_day(ds), load_settings())


@_decided
def validate_partition(ds: str | None) -> dict:
    return pipeline.validate_partition(_day(ds), load_settings())


@_decided
def build_features(ds: str | None) -> dict:
    from dayloop.features.spark import resolve_spark_master

    settings = load_settings()
    master = resolve_spark_master(settings.spark_conn_id, settings.spark_master_default)
    log.info("spark master: %s", master)
    return pipeline.build_features(_day(ds), settings, master)


@_decided
def train_model(ds: str | None, features: dict, params: dict | None = None) -> dict:
    overrides = _params(params, {"train_epochs": "epochs"})
    return pipeline.train_model(_day(ds), load_settings(), features["features"], overrides)


@_decided
def register_model(ds: str | None, trained: dict, features: dict, run_id: str | None = None) -> dict:
    return pipeline.register_model(_day(ds), load_settings(), trained, features, airflow_run_id=run_id)


@_decided
def gate_model(ds: str | None, registered: dict, features: dict, params: dict | None = None) -> dict:
    overrides = _params(params, {"noninferiority_margin": "noninferiority_margin"})
    return pipeline.gate_model(_day(ds), load_settings(), registered["version"], features["features"], overrides)


@_decided
def rebuild_index(ds: str | None, gated: dict, features: dict, params: dict | None = None) -> dict:
    floor = float((params or {}).get("index_recall_floor") or 0.95)
    return pipeline.rebuild_index(_day(ds), load_settings(), gated["version"], features["features"],
                                  recall_floor=floor)


@_decided
def publish_candidate(ds: str | None, indexed: dict) -> dict:
    return pipeline.publish_candidate(_day(ds), load_settings(), indexed["version"])


# --------------------------------------------------------------------------- rollout


def _actor(run_id: str | None, dag_id: str = "daily_refresh") -> str:
    return f"{dag_id}/{run_id}" if run_id else dag_id


@_decided
def check_rollout_plan(params: dict | None) -> dict:
    from dayloop.rollout import controller

    if (params or {}).get("deploy") is False:
        return {"deploy": False}
    plan = controller.resolve_plan(params)
    log.info("rollout plan %s: %s", plan.name, [s.to_dict() for s in plan.steps])
    return {"deploy": True, "plan": plan.name, "max_duration_s": plan.max_duration_seconds()}


@_decided
def deploy_canary(published: dict, params: dict | None = None, run_id: str | None = None) -> dict:
    from dayloop.rollout import controller

    return controller.deploy_canary(load_settings(), published, params, _actor(run_id)).to_dict()


@_decided
def route_next_step(ctx: Any, step_index: int) -> str:
    from dayloop.rollout import controller
    from dayloop.rollout.deploy import RolloutAborted

    settings = load_settings()
    rollout = _context(ctx)
    try:
        return controller.route_next_step(settings, rollout, step_index)
    except RolloutAborted as exc:
        controller.record_failure(settings, rollout.version, f"aborted before step {step_index}: {exc}")
        raise


def record_step(ctx: Any, record: dict) -> None:
    from dayloop.rollout import controller

    controller.record_step(load_settings(), _context(ctx), record)


@_decided
def stop_rollout(ctx: Any, record: dict) -> None:
    from dayloop.rollout import controller

    reason = controller.fail_step(load_settings(), _context(ctx), record)
    raise controller.RolloutFailed(reason)


@_decided
def promote_canary(ctx: dict | None, baked: dict | None, run_id: str | None = None) -> dict:
    from dayloop.rollout import controller

    return controller.promote_canary(load_settings(), _context(ctx), baked, _actor(run_id))


def retire_due(ctx: dict | None, promoted: dict | None) -> str | None:
    from dayloop.rollout import controller

    return controller.retire_due(_context(ctx), promoted)


@_decided
def retire_previous(ctx: dict | None, promoted: dict | None) -> dict:
    from dayloop.rollout import controller

    return controller.retire_previous(load_settings(), _context(ctx), promoted)


@_decided
def rollback_canary(ti: Any, run_id: str | None = None) -> dict:
    """Pulls what exists of the run's rollout (upstream tasks may have failed before pushing)."""
    from dayloop.rollout import controller

    published = ti.xcom_pull(task_ids="index.publish_candidate")
    ctx = _context(ti.xcom_pull(task_ids="rollout.deploy_canary"))
    return controller.rollback_canary(load_settings(), published, ctx, _actor(run_id))


@_decided
def report_rollout(ti: Any, ds: str | None = None) -> dict:
    from dayloop.rollout import controller

    settings = load_settings()
    steps = ti.xcom_pull(task_ids="rollout.bake_and_ramp", key="steps")
    out_dir = settings.reports_dir / "rollouts" / (ds or "undated")
    return controller.report_rollout(
        settings, ti.xcom_pull(task_ids="index.publish_candidate"), _context(ti.xcom_pull(task_ids="rollout.deploy_canary")),
        steps, ti.xcom_pull(task_ids="rollout.promote_canary"), ti.xcom_pull(task_ids="rollout.rollback_canary"),
        out_dir)


# --------------------------------------------------------------------------- manual rollback


def _triggered_by(dag_run: Any) -> str:
    return str(getattr(dag_run, "triggering_user_name", None) or "unknown")


@_decided
def validate_rollback_request(params: dict | None) -> dict:
    from dayloop.rollout import controller, manual

    p = params or {}
    out = manual.plan_rollback(load_settings(), controller.plane_client(), model=p.get("model"),
                               target=p.get("target_version"), reason=p.get("reason"), force=bool(p.get("force")))
    log.info("rollback request valid: %s", out)
    return out


@_decided
def execute_manual_rollback(params: dict | None, dag_run: Any = None) -> dict:
    from dayloop.rollout import controller, manual

    p = params or {}
    return manual.execute_rollback(load_settings(), controller.plane_client(), model=p.get("model"),
                                   target=p.get("target_version"), reason=p.get("reason") or "",
                                   actor=_triggered_by(dag_run), dry_run=bool(p.get("dry_run")),
                                   force=bool(p.get("force")))
