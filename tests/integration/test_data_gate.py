"""Data gate with real Great Expectations: planted faults are blocked, clean days pass."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from dayloop.config import Settings, SyntheticSettings, load_settings
from dayloop.data import faults, landing
from dayloop.data.movielens import ensure_movielens
from dayloop.data.schema import partition_dir, partition_file
from dayloop.data.world import open_world
from dayloop.errors import DataGateFailed
from dayloop.quality.data_gate import (
    DataGateThresholds,
    run_data_gate,
    validate_partition,
    validation_record_path,
)
from dayloop.quality.delivery_checks import DeliveryThresholds

pytestmark = pytest.mark.integration

START = dt.date(2026, 4, 1)
ML_START = dt.date(2026, 1, 1)
SYNTH = SyntheticSettings(n_users=300, n_items=400, dim=8, events_per_day=2000,
                          history_days=7, replay_days=3, seed=5)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    s = Settings(home=tmp_path / "home", data_cache=tmp_path / "cache", source="synthetic",
                 replay_start_override=START, synthetic=SYNTH)
    landing.seed_history(s)
    landing.land_partition(START, s)
    return s


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def plant(settings: Settings, fault) -> None:
    landing.write_partition(fault(landing.read_partition(START, settings)), START, settings)


def test_a_clean_synthetic_day_passes_and_is_recorded(settings: Settings) -> None:
    result = run_data_gate(START, settings)
    assert result.passed and result.reasons == []
    assert result.stats["rows"] == SYNTH.events_per_day
    names = {c["name"] for c in result.checks}
    assert {"expect_table_columns_to_match_set", "expect_column_values_to_not_be_null",
            "expect_column_values_to_be_of_type", "expect_column_values_to_be_between",
            "volume", "drift_rating", "drift_genre", "drift_item_concentration",
            "expect_compound_columns_to_be_unique", "pair_duplicates", "time_gap", "hour_profile",
            "user_concentration", "user_burst", "timestamp_cluster", "out_of_day_events"} <= names
    record = json.loads(validation_record_path(START, settings).read_text())
    assert record["passed"] is True and record["ds"] == START.isoformat()
    assert partition_file(settings.landing_dir, START).is_file()


def test_validate_partition_has_no_side_effects(settings: Settings) -> None:
    plant(settings, faults.volume_drop)
    before = tree(settings.home)
    assert not validate_partition(START, settings).passed
    assert tree(settings.home) == before


FAULTS = {
    "missing column": (lambda df: faults.drop_column(df, "rating"),
                       ["expect_table_columns_to_match_set", "missing ['rating']"]),
    "null spike": (lambda df: faults.null_spike(df, 0.2, "item_id"),
                   ["expect_column_values_to_not_be_null(item_id): 400 of 2000"]),
    "out-of-day timestamps": (lambda df: faults.out_of_day_timestamps(df, 0.05),
                              ["expect_column_values_to_be_between(ts): 100 of 2000"]),
    "volume drop": (lambda df: faults.volume_drop(df, 0.3),
                    ["volume: 600 rows is 0.30x the median 2000"]),
    "distribution drift": (faults.distribution_drift,
                           ["drift_rating: Jensen-Shannon", "drift_genre: Jensen-Shannon"]),
    "rating shift only": (lambda df: faults.distribution_drift(df, rating_shift=-2, n_items=400),
                          ["drift_rating: Jensen-Shannon"]),
    "unknown users": (lambda df: df.assign(user_id=df["user_id"] + 10_000),
                      ["expect_column_values_to_be_between(user_id): 2000 of 2000"]),
    "rating out of range": (lambda df: df.assign(rating=df["rating"] + 5),
                            ["expect_column_values_to_be_between(rating)"]),
    "nanosecond timestamps": (lambda df: df.assign(ts=df["ts"].astype("datetime64[ns, UTC]")),
                              ["schema_dtypes: ts is datetime64[ns, UTC]"]),
    "text ratings": (lambda df: df.assign(rating=df["rating"].astype(str)),
                     ["expect_column_values_to_be_of_type(rating): observed type"]),
    "naive timestamps": (lambda df: df.assign(ts=df["ts"].dt.tz_localize(None)),
                         ["expect_column_values_to_be_of_type(ts)"]),
}
# How deliveries go wrong (each passes the volume check: 0.75x..1.8x the trailing median).
DELIVERY_FAULTS = {
    "re-delivered slice": (lambda df: faults.redeliver_slice(df, 6, 2),
                           ["expect_compound_columns_to_be_unique(user_id, item_id, ts): ",
                            "pair_duplicates: "]),
    "re-delivered with new times": (lambda df: faults.redeliver_slice(df, 6, 2, restamp=pd.Timedelta(hours=5)),
                                    ["pair_duplicates: "]),
    "hours missing": (lambda df: faults.partial_delivery(df, 9, 6),
                      ["time_gap: no events from 0", "hour_profile: "]),
    "hours thinned": (lambda df: faults.partial_delivery(df, 0, 12, keep_frac=0.3), ["hour_profile: "]),
    "one account floods": (faults.user_flood, ["user_concentration: user "]),
    "a burst from one user": (faults.user_burst, ["user_burst: user "]),
    "stuck clock": (faults.timestamp_cluster, ["timestamp_cluster: 100 events stamped 12:00:00"]),
    "clock ahead, edge cut off": (faults.clock_skew, ["time_gap: no events from 00:00:00 to 0"]),
    "late events": (lambda df: faults.out_of_day_timestamps(df, 0.03, shift=pd.Timedelta(hours=-30)),
                    ["expect_column_values_to_be_between(ts)", "out_of_day_events: 60 events (3.0%) dated before"]),
}
FAULTS.update(DELIVERY_FAULTS)


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_planted_fault_is_blocked_with_its_reason(settings: Settings, name: str) -> None:
    fault, expected = FAULTS[name]
    plant(settings, fault)
    result = validate_partition(START, settings)
    assert not result.passed
    for fragment in expected:
        assert any(fragment in r for r in result.reasons), (fragment, result.reasons)


def test_a_failed_gate_quarantines_logs_and_raises(settings: Settings, caplog) -> None:
    plant(settings, lambda df: faults.null_spike(faults.volume_drop(df, 0.3), 0.1))
    caplog.set_level(logging.ERROR, logger="dayloop.data_gate")
    with pytest.raises(DataGateFailed) as err:
        run_data_gate(START, settings)
    assert len(err.value.reasons) >= 2
    assert any(r.startswith("volume") for r in err.value.reasons)
    logged = [r.getMessage() for r in caplog.records if r.name == "dayloop.data_gate"]
    for reason in err.value.reasons:
        assert any(reason in m for m in logged)
    assert not partition_dir(settings.landing_dir, START).exists()
    quarantined = partition_dir(settings.quarantine_dir, START)
    assert (quarantined / "part-00000.parquet").is_file()
    record = json.loads((quarantined / "validation.json").read_text())
    assert record["passed"] is False and record["reasons"] == err.value.reasons
    assert not validation_record_path(START, settings).exists()
    # Re-landing the day from the source brings back a clean partition that passes.
    landing.land_partition(START, settings)
    assert run_data_gate(START, settings).passed


def test_a_missing_partition_fails_clearly(settings: Settings) -> None:
    day = START + dt.timedelta(days=1)
    result = validate_partition(day, settings)
    assert not result.passed and "no partition landed" in result.reasons[0]
    with pytest.raises(DataGateFailed, match="no partition landed"):
        run_data_gate(day, settings)
    assert (partition_dir(settings.quarantine_dir, day) / "validation.json").is_file()


def test_an_unreadable_partition_fails_instead_of_crashing(settings: Settings) -> None:
    partition_file(settings.landing_dir, START).write_bytes(b"PAR1 this is not parquet")
    result = validate_partition(START, settings)
    assert not result.passed
    assert result.reasons[0].startswith("partition_readable: cannot read")


def test_without_trailing_days_volume_and_drift_pass_with_a_note(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "home", data_cache=tmp_path / "cache", source="synthetic",
                 replay_start_override=START, synthetic=SYNTH)
    landing.land_partition(START, s)
    result = validate_partition(START, s)
    assert result.passed, result.reasons
    assert any("no trailing landed days" in n for n in result.stats["notes"])
    landing.write_partition(landing.read_partition(START, s).iloc[0:0], START, s)
    empty = validate_partition(START, s)
    assert not empty.passed and any(r.startswith("volume: 0 rows") for r in empty.reasons)


def test_thresholds_are_honoured(settings: Settings) -> None:
    plant(settings, lambda df: faults.volume_drop(df, 0.7))
    assert validate_partition(START, settings).passed
    strict = DataGateThresholds(volume_min_ratio=0.8)
    assert not validate_partition(START, settings, strict).passed
    plant(settings, lambda df: faults.user_burst(df, n_events=25))
    assert validate_partition(START, settings).passed
    strict = DataGateThresholds(delivery=DeliveryThresholds(burst_max_events=20))
    assert validate_partition(START, settings, strict).reasons[0].startswith("user_burst: ")


def test_every_real_movielens_replay_day_passes(tmp_path: Path, monkeypatch) -> None:
    """Calibration guard: the 30 default replay days of MovieLens-1M all pass."""
    monkeypatch.setenv("DAYLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAYLOOP_SOURCE", "movielens")
    monkeypatch.setenv("DAYLOOP_REPLAY_START", ML_START.isoformat())
    for name in ("DAYLOOP_EVENTS_PER_DAY", "DAYLOOP_REPLAY_DAYS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    ensure_movielens(s.data_cache)
    world = open_world(s)
    landing.seed_history(s, world)
    failures = {}
    for k in range(s.replay_days):
        ds = ML_START + dt.timedelta(days=k)
        landing.land_partition(ds, s, world)
        result = validate_partition(ds, s)
        if not result.passed:
            failures[ds.isoformat()] = result.reasons
    assert failures == {}
    # And a planted fault on a real day is still caught, each delivery fault by its check.
    last = ML_START + dt.timedelta(days=s.replay_days - 1)
    clean = landing.read_partition(last, s)
    landing.write_partition(faults.distribution_drift(clean), last, s)
    assert not validate_partition(last, s).passed
    for name, (fault, expected) in DELIVERY_FAULTS.items():
        landing.write_partition(fault(clean), last, s)
        reasons = validate_partition(last, s).reasons
        for check in {fragment.split(":")[0].split("(")[0] for fragment in expected}:
            assert any(r.startswith(check) for r in reasons), (name, check, reasons)
    landing.write_partition(clean, last, s)
    pd.testing.assert_frame_equal(landing.read_partition(ML_START, s),
                                  world.interactions(ML_START))
