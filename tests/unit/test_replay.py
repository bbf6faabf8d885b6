"""ReplayCalendar: slicing by count, boundaries, re-timing, history and errors."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from dayloop.data.replay import ReplayCalendar, retime, sort_events
from dayloop.errors import DataUnavailable

START = dt.date(2026, 1, 10)


def day(offset: int) -> dt.date:
    return START + dt.timedelta(days=offset)


@pytest.fixture()
def cal() -> ReplayCalendar:
    # 23 events, 5 per day, 2 replay days: replay = events 13..22, history = 13 events
    # cut backwards from day 0 into 5 (day -1), 5 (day -2) and a short 3 (day -3).
    return ReplayCalendar(n_events=23, events_per_day=5, replay_days=2, replay_start=START)


def test_slices_by_count_with_short_earliest_history_day(cal: ReplayCalendar) -> None:
    assert cal.n_history_events == 13
    assert cal.n_history_days == 3
    assert cal.event_slice(-3) == (0, 3)
    assert cal.event_slice(-2) == (3, 8)
    assert cal.event_slice(-1) == (8, 13)
    assert cal.event_slice(0) == (13, 18)
    assert cal.event_slice(1) == (18, 23)


def test_slices_tile_the_log_without_gaps_or_overlap() -> None:
    cal = ReplayCalendar(n_events=1_000_209, events_per_day=5000, replay_days=30, replay_start=START)
    bounds = [cal.event_slice(i) for i in range(-cal.n_history_days, cal.replay_days)]
    assert bounds[0][0] == 0 and bounds[-1][1] == 1_000_209
    for (_lo1, hi1), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi1 == lo2
    assert all(hi - lo == 5000 for lo, hi in bounds[1:])
    # 850,209 history events: 170 full days and one of 209.
    assert cal.n_history_days == 171
    assert bounds[0] == (0, 209)


def test_exact_multiple_history_has_no_short_day() -> None:
    cal = ReplayCalendar(n_events=20, events_per_day=5, replay_days=2, replay_start=START)
    assert cal.history_days == [day(-2), day(-1)]
    assert cal.event_slice(-2) == (0, 5)


def test_no_history_when_everything_is_replay() -> None:
    cal = ReplayCalendar(n_events=10, events_per_day=5, replay_days=2, replay_start=START)
    assert cal.history_days == []
    assert cal.first_day == START


def test_dates_and_indices_round_trip(cal: ReplayCalendar) -> None:
    assert cal.first_day == day(-3)
    assert cal.last_day == day(1)
    assert cal.history_days == [day(-3), day(-2), day(-1)]
    assert cal.replay_dates == [day(0), day(1)]
    for i in range(-3, 2):
        assert cal.day_index(cal.ds_for(i)) == i
    assert cal.day_index("2026-01-10") == 0
    # A datetime is reduced to its UTC date.
    assert cal.day_index(dt.datetime(2026, 1, 11, 23, 0, tzinfo=dt.timezone.utc)) == 1


@pytest.mark.parametrize("outside", [day(-4), day(2), dt.date(1999, 1, 1)])
def test_dates_outside_the_data_raise_with_the_valid_range(cal: ReplayCalendar, outside) -> None:
    with pytest.raises(DataUnavailable) as err:
        cal.day_index(outside)
    assert str(day(-3)) in str(err.value) and str(day(1)) in str(err.value)


@pytest.mark.parametrize("index", [-4, 2])
def test_indices_outside_the_data_raise(cal: ReplayCalendar, index: int) -> None:
    with pytest.raises(DataUnavailable):
        cal.event_slice(index)


def test_too_few_events_for_the_replay_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        ReplayCalendar(n_events=9, events_per_day=5, replay_days=2, replay_start=START)
    with pytest.raises(ValueError):
        ReplayCalendar(n_events=9, events_per_day=0, replay_days=2, replay_start=START)


@pytest.mark.parametrize("n", [1, 2, 7, 5000])
def test_retime_stays_inside_the_day_and_keeps_order(n: int) -> None:
    ts = retime(n, START)
    lo = pd.Timestamp(START, tz="UTC")
    assert str(ts.dtype) == "datetime64[us, UTC]"
    assert len(ts) == n
    assert ts[0] == lo
    assert ts.max() < lo + pd.Timedelta(days=1)
    assert (np.diff(ts.asi8) > 0).all()  # strictly increasing: no ties downstream


def test_retime_spreads_evenly_across_the_day() -> None:
    ts = retime(4, START)
    assert [t.hour for t in ts] == [0, 6, 12, 18]


def test_sort_events_breaks_timestamp_ties_by_user_then_item() -> None:
    t = pd.Timestamp("2000-05-01", tz="UTC")
    events = pd.DataFrame({
        "user_id": [2, 1, 1, 3],
        "item_id": [1, 9, 4, 1],
        "rating": [1, 2, 3, 4],
        "ts": [t, t, t, t - pd.Timedelta(seconds=1)],
    })
    out = sort_events(events)
    assert out[["user_id", "item_id"]].values.tolist() == [[3, 1], [1, 4], [1, 9], [2, 1]]


def test_replayed_days_never_see_the_future() -> None:
    # A front-heavy log: most events early, a thin tail, many ties.
    rng = np.random.default_rng(0)
    n = 1234
    seconds = np.concatenate([rng.integers(0, 1000, 1000), rng.integers(1000, 10**6, n - 1000)])
    events = sort_events(pd.DataFrame({
        "user_id": rng.integers(1, 50, n), "item_id": rng.integers(1, 80, n),
        "rating": rng.integers(1, 6, n),
        "ts": pd.to_datetime(seconds, unit="s", utc=True),
    }))
    cal = ReplayCalendar(n_events=n, events_per_day=100, replay_days=5, replay_start=START)
    prev_max = None
    for i in range(-cal.n_history_days, cal.replay_days):
        lo, hi = cal.event_slice(i)
        chunk = events.iloc[lo:hi]
        if prev_max is not None:
            assert chunk["ts"].min() >= prev_max
        prev_max = chunk["ts"].max()
        new_ts = retime(len(chunk), cal.ds_for(i))
        # The order of the original events is kept by the new times.
        assert (np.diff(new_ts.asi8) > 0).all()
