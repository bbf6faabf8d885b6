"""Planted faults: the plan is parsed strictly, and every data fault the plan can name is
applied to the day it names, so the DAG and e2e tests can plant each case through the world."""

from __future__ import annotations

import datetime as dt

import pytest

from dayloop.config import ConfigError, SyntheticSettings
from dayloop.data.synthetic import SyntheticWorld
from dayloop.planted import ALL_FAULTS, DATA_FAULTS, SERVING_FAULTS, PlantedWorld, fault_plan, faults_for
from dayloop.quality.delivery_checks import DeliveryThresholds, delivery_checks

START = dt.date(2026, 6, 1)
DAY = START + dt.timedelta(days=7)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SyntheticSettings(n_users=300, n_items=400, events_per_day=2000, history_days=0,
                                            replay_days=8, seed=3), START)


def test_the_plan_is_parsed_and_an_unknown_fault_is_an_error(monkeypatch):
    raw = f"{DAY}:user_flood, {DAY}:champion_copy,2026-06-02:null_spike"
    plan = fault_plan(raw)
    assert plan[DAY] == {"user_flood", "champion_copy"}
    monkeypatch.setenv("DAYLOOP_PLANT_FAULTS", raw)
    assert faults_for(DAY, SERVING_FAULTS) == {"champion_copy"}
    assert fault_plan("") == {}
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD"):
        fault_plan(f"{DAY}:not_a_fault")
    assert set(DATA_FAULTS) <= set(ALL_FAULTS) and "champion_copy" in ALL_FAULTS


@pytest.mark.parametrize("fault", ["redeliver_slice", "partial_delivery", "user_flood", "user_burst",
                                   "timestamp_cluster", "clock_skew"])
def test_each_delivery_fault_is_planted_on_its_day_and_caught_by_a_delivery_check(world, fault):
    planted = PlantedWorld(world, {DAY: {fault}})
    clean, broken = world.interactions(DAY), planted.interactions(DAY)
    assert not broken.equals(clean)
    assert planted.interactions(DAY - dt.timedelta(days=1)).equals(world.interactions(DAY - dt.timedelta(days=1)))
    trailing = [(d, world.interactions(d)) for d in (START + dt.timedelta(days=k) for k in range(7))]
    failed = [c["name"] for c in delivery_checks(broken, DAY, trailing, DeliveryThresholds()) if not c["passed"]]
    assert failed, f"{fault} planted but no delivery check failed"
    assert not [c for c in delivery_checks(clean, DAY, trailing, DeliveryThresholds()) if not c["passed"]]
