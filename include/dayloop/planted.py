"""Planted faults: a deliberate, declared way to break one day on purpose.

Tests and demos use it to prove that each gate catches what it should, through
the real DAG. The plan comes from ``DAYLOOP_PLANT_FAULTS``, a comma-separated
list of ``YYYY-MM-DD:fault`` entries, e.g.
``2026-11-03:null_spike,2026-11-04:shuffle_item_ids``. Unset means no faults;
an unknown fault name is an error, never silently ignored.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable

from dayloop.config import ConfigError, parse_day

# Faults that corrupt the landed partition (applied at the source, so the
# landing step lands exactly what a broken upstream would deliver).
DATA_FAULTS = ("drop_column", "null_spike", "out_of_day_timestamps", "volume_drop", "distribution_drift",
               # how deliveries go wrong (dayloop.quality.delivery_checks)
               "redeliver_slice", "partial_delivery", "user_flood", "user_burst", "timestamp_cluster",
               "clock_skew")
# Faults that corrupt a later stage.
MODEL_FAULTS = ("shuffle_item_ids",)
INDEX_FAULTS = ("broken_index",)
# Training-serving skew: the exported serving tower maps each user id to another user's
# row (embedding, features, history). The model itself is fine, so the offline gate (which
# evaluates the model, not the serving export) passes it; only users online can tell.
SERVING_FAULTS = ("serving_skew", "champion_copy")
# champion_copy is a planted case, not a fault: the day's bundle is the champion's own
# (an A/A canary: the online test must promote it).
ALL_FAULTS = DATA_FAULTS + MODEL_FAULTS + INDEX_FAULTS + SERVING_FAULTS


def fault_plan(raw: str | None = None) -> dict[dt.date, set[str]]:
    """Parse the plan; raises ConfigError naming the bad entry."""
    raw = os.environ.get("DAYLOOP_PLANT_FAULTS", "") if raw is None else raw
    plan: dict[dt.date, set[str]] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        day, sep, fault = entry.partition(":")
        if not sep or fault not in ALL_FAULTS:
            raise ConfigError(
                f"DAYLOOP_PLANT_FAULTS entry {entry!r}: expected YYYY-MM-DD:<fault> with fault in {ALL_FAULTS}"
            )
        plan.setdefault(parse_day(day), set()).add(fault)
    return plan


def faults_for(ds: dt.date, kinds: tuple[str, ...] = ALL_FAULTS) -> set[str]:
    return {f for f in fault_plan().get(ds, set()) if f in kinds}


class PlantedWorld:
    """Wraps a World and corrupts the interactions of planted days."""

    def __init__(self, world, plan: dict[dt.date, set[str]] | None = None):
        self._world = world
        self._plan = fault_plan() if plan is None else plan

    def __getattr__(self, name):
        return getattr(self._world, name)

    def interactions(self, ds: dt.date):
        from dayloop.data import faults

        df = self._world.interactions(ds)
        funcs: dict[str, Callable] = {
            "drop_column": lambda d: faults.drop_column(d, "rating"),
            "null_spike": faults.null_spike,
            "out_of_day_timestamps": faults.out_of_day_timestamps,
            "volume_drop": faults.volume_drop,
            "distribution_drift": faults.distribution_drift,
            "redeliver_slice": lambda d: faults.redeliver_slice(d, day=ds),
            "partial_delivery": lambda d: faults.partial_delivery(d, day=ds),
            "user_flood": lambda d: faults.user_flood(d, day=ds),
            "user_burst": lambda d: faults.user_burst(d, day=ds),
            "timestamp_cluster": lambda d: faults.timestamp_cluster(d, day=ds),
            "clock_skew": lambda d: faults.clock_skew(d, day=ds),
        }
        for fault in sorted(self._plan.get(ds, set()) & set(DATA_FAULTS)):
            df = funcs[fault](df)
        return df
