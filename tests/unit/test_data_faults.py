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
                  faults.volume_drop, faults.distribution_drift):
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
