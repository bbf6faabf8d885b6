"""Fault planting helpers: each returns a new, reproducibly broken frame."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from dayloop.config import SyntheticSettings
from dayloop.data import faults
from dayloop.data.synthetic import SyntheticWorld

DAY = dt.date(2026, 6, 1)


@pytest.fixture()
def clean() -> pd.DataFrame:
    settings = SyntheticSettings(n_users=50, n_items=60, events_per_day=1000, history_days=0,
                                 replay_days=1)
    return SyntheticWorld(settings, DAY).interactions(DAY)


def test_faults_never_modify_their_input(clean: pd.DataFrame) -> None:
    before = clean.copy()
    for fault in (faults.drop_column, faults.null_spike, faults.out_of_day_timestamps,
                  faults.volume_drop, faults.distribution_drift, faults.redeliver_slice,
                  faults.partial_delivery, faults.user_flood, faults.user_burst,
                  faults.timestamp_cluster, faults.clock_skew):
        fault(clean)
    pd.testing.assert_frame_equal(clean, before)


def test_drop_column(clean: pd.DataFrame) -> None:
    assert list(faults.drop_column(clean, "ts").columns) == ["user_id", "item_id", "rating"]
    with pytest.raises(ValueError, match="no column"):
        faults.drop_column(clean, "nope")


def test_null_spike_hits_the_requested_share(clean: pd.DataFrame) -> None:
    out = faults.null_spike(clean, 0.25, "rating")
    assert out["rating"].isna().sum() == 250
    assert out.equals(faults.null_spike(clean, 0.25, "rating"))  # seeded


def test_out_of_day_timestamps_leave_the_day(clean: pd.DataFrame) -> None:
    out = faults.out_of_day_timestamps(clean, 0.1)
    end = pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(days=1)
    assert (out["ts"] >= end).sum() == 100
    assert str(out["ts"].dtype) == str(clean["ts"].dtype)


def test_volume_drop_keeps_order_and_share(clean: pd.DataFrame) -> None:
    out = faults.volume_drop(clean, 0.3)
    assert len(out) == 300 and out["ts"].is_monotonic_increasing
    assert len(faults.volume_drop(clean, 0.0)) == 0
    with pytest.raises(ValueError):
        faults.volume_drop(clean, 1.5)


def test_distribution_drift_narrows_items_and_shifts_ratings(clean: pd.DataFrame) -> None:
    out = faults.distribution_drift(clean, rating_shift=-2, n_items=5)
    assert out["item_id"].nunique() <= 5
    assert set(out["item_id"]) <= set(clean["item_id"])
    assert out["rating"].between(1, 5).all()
    assert out["rating"].mean() < clean["rating"].mean() - 1
    assert out.dtypes.equals(clean.dtypes)


START = pd.Timestamp(DAY, tz="UTC")


def _hours(df: pd.DataFrame) -> pd.Series:
    return (df["ts"] - START) / pd.Timedelta(hours=1)


def test_delivery_faults_keep_the_schema_and_a_sorted_day(clean: pd.DataFrame) -> None:
    for fault in (faults.redeliver_slice, faults.partial_delivery, faults.user_flood, faults.user_burst,
                  faults.timestamp_cluster, faults.clock_skew):
        out = fault(clean)
        assert out.dtypes.equals(clean.dtypes), fault.__name__
        assert out["ts"].is_monotonic_increasing, fault.__name__
        assert out.equals(fault(clean)), fault.__name__  # seeded


def test_redeliver_slice_repeats_the_window_exactly_or_restamped(clean: pd.DataFrame) -> None:
    window = clean[_hours(clean).between(6, 8, inclusive="left")]
    out = faults.redeliver_slice(clean, 6, 2)
    assert len(out) == len(clean) + len(window)
    assert out.duplicated().sum() == len(window)
    moved = faults.redeliver_slice(clean, 6, 2, restamp=pd.Timedelta(hours=10))
    assert moved.duplicated().sum() == 0
    assert moved.duplicated(["user_id", "item_id"]).sum() >= len(window)
    late = faults.redeliver_slice(clean, 6, 2, restamp=pd.Timedelta(hours=20))
    assert late["ts"].max() < START + pd.Timedelta(days=1)  # clipped inside the day
    with pytest.raises(ValueError, match="inside the day"):
        faults.redeliver_slice(clean, 23, 2)


def test_partial_delivery_empties_or_thins_the_window(clean: pd.DataFrame) -> None:
    inside = _hours(clean).between(0, 6, inclusive="left").sum()
    gap = faults.partial_delivery(clean, 0, 6)
    assert len(gap) == len(clean) - inside and _hours(gap).min() >= 6
    thin = faults.partial_delivery(clean, 0, 6, keep_frac=0.5)
    assert _hours(thin).lt(6).sum() == round(0.5 * inside)
    with pytest.raises(ValueError):
        faults.partial_delivery(clean, 0, 6, keep_frac=2)


def test_user_flood_and_burst_add_one_users_events(clean: pd.DataFrame) -> None:
    flood = faults.user_flood(clean, frac=0.5, user_id=7)
    assert len(flood) == 1500 and (flood["user_id"] == 7).sum() == (clean["user_id"] == 7).sum() + 500
    burst = faults.user_burst(clean, n_events=40, seconds=10, at_hour=3, user_id=9)
    extra = burst[(burst["user_id"] == 9) & _hours(burst).between(3, 3 + 10 / 3600)]
    assert len(burst) == 1040 and len(extra) >= 40
    with pytest.raises(ValueError):
        faults.user_flood(clean, frac=0)
    with pytest.raises(ValueError):
        faults.user_burst(clean, n_events=0)


def test_timestamp_cluster_and_clock_skew(clean: pd.DataFrame) -> None:
    stuck = faults.timestamp_cluster(clean, frac=0.1, at_hour=5)
    assert (stuck["ts"] == START + pd.Timedelta(hours=5)).sum() >= 100 and len(stuck) == len(clean)
    ahead = faults.clock_skew(clean, pd.Timedelta(hours=3))
    assert _hours(ahead).min() >= 3 and _hours(ahead).max() < 24
    assert len(ahead) == _hours(clean).lt(21).sum()
    behind = faults.clock_skew(clean, pd.Timedelta(hours=-2))
    assert _hours(behind).max() < 22 and _hours(behind).min() >= 0
    with pytest.raises(ValueError):
        faults.clock_skew(clean, pd.Timedelta(days=2))
