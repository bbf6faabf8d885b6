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


def _params(params: dict | None, mapping: dict[str, str]) -> dict[str, Any]:
    """Pick the Params that override a stage's settings, dropping the unset ones."""
    params = params or {}
    return {target: params[source] for source, target in mapping.items() if params.get(source) is not None}


@_decided
def land_partition(ds: str | None) -> dict:
    return pipeline.land(_day(ds), load_settings())


@_decided
def validate_partition(ds: str | None) -> dict:
    return pipeline.validate(_day(ds), load_settings())


@_decided
def build_features(ds: str | None) -> dict:
    from dayloop.features.spark import resolve_spark_master

    settings = load_settings()
    master = resolve_spark_master(settings.spark_conn_id, settings.spark_master_default)
    log.info("spark master: %s", master)
    return pipeline.features(_day(ds), settings, master)


@_decided
def train_model(ds: str | None, features: dict, params: dict | None = None) -> dict:
    overrides = _params(params, {"train_epochs": "epochs"})
    return pipeline.train(_day(ds), load_settings(), features["features"], overrides)


@_decided
def register_model(ds: str | None, trained: dict, features: dict, run_id: str | None = None) -> dict:
    return pipeline.register(_day(ds), load_settings(), trained, features, airflow_run_id=run_id)


@_decided
def gate_model(ds: str | None, registered: dict, features: dict, params: dict | None = None) -> dict:
    overrides = _params(params, {"noninferiority_margin": "noninferiority_margin"})
    return pipeline.offline_gate(_day(ds), load_settings(), registered["version"],
                                 features["features"], overrides)


@_decided
def rebuild_index(ds: str | None, gated: dict, features: dict, params: dict | None = None) -> dict:
    floor = float((params or {}).get("index_recall_floor") or 0.95)
    return pipeline.build_index(_day(ds), load_settings(), gated["version"], features["features"],
                                recall_floor=floor)


@_decided
def publish_candidate(ds: str | None, indexed: dict) -> dict:
    return pipeline.publish(_day(ds), load_settings(), indexed["version"])
