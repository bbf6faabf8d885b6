"""Delivery checks of the data gate (pure functions on in-memory frames, no GX, no disk)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pandas as pd
import pytest

from dayloop.config import SyntheticSettings
from dayloop.data import faults
from dayloop.data.replay import retime
from dayloop.data.synthetic import SyntheticWorld
from dayloop.quality.delivery_checks import DeliveryThresholds, day_seconds, delivery_checks

START = dt.date(2026, 6, 1)
TODAY = START + dt.timedelta(days=7)
TH = DeliveryThresholds()


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(SyntheticSettings(n_users=300, n_items=400, events_per_day=2000, history_days=0,
                                            replay_days=8, seed=3), START)


@pytest.fixture(scope="module")
def trailing(world: SyntheticWorld) -> list[tuple[dt.date, pd.DataFrame]]:
    return [(d, world.interactions(d)) for d in (START + dt.timedelta(days=k) for k in range(7))]


@pytest.fixture()
def today(world: SyntheticWorld) -> pd.DataFrame:
    return world.interactions(TODAY)


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


def failed(checks: list[dict]) -> dict[str, str]:
    return {c["name"]: c["reason"] for c in checks if not c["passed"]}


def test_a_clean_day_passes_every_delivery_check(today, trailing) -> None:
    checks = delivery_checks(today, TODAY, trailing, TH)
    assert failed(checks) == {}
    assert set(by_name(checks)) == {"out_of_day_events", "pair_duplicates", "user_concentration", "time_gap",
                                    "hour_profile", "user_burst", "timestamp_cluster"}
    assert all(c["kind"] == "delivery" for c in checks)


def test_a_replay_day_is_flat_by_construction(today, trailing) -> None:
    # What the real MovieLens days look like to these checks: re-timed linearly in rank.
    flat = today.assign(ts=retime(len(today), TODAY))
    checks = by_name(delivery_checks(flat, TODAY, trailing, TH))
    assert failed(list(checks.values())) == {}
    assert checks["time_gap"]["observed"]["longest"]["minutes"] == pytest.approx(86_400 / 2000 / 60, rel=1e-6)
    assert checks["timestamp_cluster"]["observed"]["events"] == 1


FAULTS = {
    "re-delivered with new times": (lambda df: faults.redeliver_slice(df, 6, 2, restamp=pd.Timedelta(hours=5)),
                                    "pair_duplicates", "repeat a (user, item) pair"),
    "hours missing": (lambda df: faults.partial_delivery(df, 9, 6), "time_gap", "UTC (6.0 h) where the trailing days put"),
    "hours thinned": (lambda df: faults.partial_delivery(df, 0, 12, keep_frac=0.3), "hour_profile",
                      "hour_profile: Jensen-Shannon distance"),
    "one account floods": (faults.user_flood, "user_concentration", "one account or a stuck producer"),
    "a burst from one user": (faults.user_burst, "user_burst", "120 events within 60 s from 12:00"),
    "stuck clock": (faults.timestamp_cluster, "timestamp_cluster", "100 events stamped 12:00:00 UTC"),
    "clock ahead": (faults.clock_skew, "time_gap", "at the day's edge"),
    "late events": (lambda df: faults.out_of_day_timestamps(df, 0.03, shift=pd.Timedelta(hours=-30)),
                    "out_of_day_events", "60 events (3.0%) dated before 2026-06-08"),
    "clock far ahead": (lambda df: faults.out_of_day_timestamps(df, 0.03), "out_of_day_events",
                        "dated after 2026-06-08"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_delivery_fault_trips_its_check(today, trailing, name: str) -> None:
    fault, check, fragment = FAULTS[name]
    reasons = failed(delivery_checks(fault(today), TODAY, trailing, TH))
    assert check in reasons, reasons
    assert fragment in reasons[check], reasons[check]


def test_a_gap_must_be_long_and_expected_to_hold_events(today, trailing) -> None:
    # 2,000 events a day: 40 min should hold ~56 events; 25 min is too short to call.
    long_gap = faults.partial_delivery(today, 10, 40 / 60)
    assert "time_gap" in failed(delivery_checks(long_gap, TODAY, trailing, TH))
    short_gap = faults.partial_delivery(today, 10, 25 / 60)
    assert "time_gap" not in failed(delivery_checks(short_gap, TODAY, trailing, TH))
    # A small source is quiet for hours by chance: 100 events a day, 2 h empty, ~9 expected.
    small = today.iloc[::20].reset_index(drop=True)
    small_trailing = [(d, f.iloc[::20]) for d, f in trailing]
    quiet = faults.partial_delivery(small, 2, 2)
    assert "time_gap" not in failed(delivery_checks(quiet, TODAY, small_trailing, TH))


def test_a_page_of_ratings_submitted_at_once_is_no_burst(today, trailing) -> None:
    # The original MovieLens times of the 30 replay slices: up to 30 events from one user
    # in 60 s, 27 at one second (a ratings page submitted at once). That is people, not a fault.
    page = faults.user_burst(today, n_events=30, seconds=0.5)
    checks = by_name(delivery_checks(page, TODAY, trailing, TH))
    assert checks["user_burst"]["passed"] and checks["user_burst"]["observed"]["events"] >= 30
    assert checks["timestamp_cluster"]["passed"] and checks["timestamp_cluster"]["observed"]["events"] >= 30


def test_thresholds_are_honoured(today, trailing) -> None:
    burst = faults.user_burst(today, n_events=25)
    assert "user_burst" not in failed(delivery_checks(burst, TODAY, trailing, TH))
    strict = dataclasses.replace(TH, burst_max_events=20)
    assert "user_burst" in failed(delivery_checks(burst, TODAY, trailing, strict))
    flood = faults.user_flood(today, frac=0.8)
    lenient = dataclasses.replace(TH, user_share_min=0.6)
    assert "user_concentration" not in failed(delivery_checks(flood, TODAY, trailing, lenient))


def test_without_trailing_days_only_the_day_itself_is_judged(today) -> None:
    checks = delivery_checks(today, TODAY, [], TH)
    assert failed(checks) == {}
    names = set(by_name(checks))
    assert {"pair_duplicates", "user_concentration", "hour_profile"}.isdisjoint(names)
    assert by_name(checks)["time_gap"]["observed"]["profile"].startswith("uniform")
    assert any("no trailing landed days" in c.get("note", "") for c in checks)
    # A gap is still judged against the day's own rate.
    assert "time_gap" in failed(delivery_checks(faults.partial_delivery(today, 0, 6), TODAY, [], TH))


def test_mistyped_or_null_input_is_skipped_not_crashed(today, trailing) -> None:
    naive = today.assign(ts=today["ts"].dt.tz_localize(None))
    checks = delivery_checks(naive, TODAY, trailing, TH)
    assert [c["passed"] for c in checks] == [True] and "skipped" in checks[0]["note"]
    with_nat = today.copy()
    with_nat.loc[with_nat.index[:10], "ts"] = pd.NaT
    secs = day_seconds(with_nat["ts"], TODAY)
    assert pd.isna(secs[:10]).all() and not pd.isna(secs[10:]).any()
    assert by_name(delivery_checks(with_nat, TODAY, trailing, TH))["out_of_day_events"]["passed"]
    assert delivery_checks(today.iloc[0:0], TODAY, trailing, TH)[0]["name"] == "delivery"


def test_checks_only_read_their_inputs(today, trailing) -> None:
    before = today.copy()
    delivery_checks(today, TODAY, trailing, TH)
    pd.testing.assert_frame_equal(today, before)
