"""ReplayCalendar: turn a static, time-ordered event log into daily partitions.

MovieLens timestamps are front-heavy (90% of ratings fall before 2000-12-29), so
days are cut by event COUNT, not by original time: after sorting every event by
``(ts, user_id, item_id)``, the last ``replay_days * events_per_day`` events are
replay days ``0 .. replay_days-1`` (exactly ``events_per_day`` each) and everything
before them is history, cut backwards into days ``-1, -2, ...`` of the same size;
the earliest history day holds the remainder and may be short.

Day ``k`` is the logical date ``replay_start + k``. Each slice is re-timed into
``[ds 00:00, ds+1 00:00)`` UTC linearly in rank, which keeps the original order,
spreads a day's traffic evenly and gives every event a distinct timestamp (so
"strictly before ts" is unambiguous downstream). Because slices are contiguous in
the global order and dates increase with the slice index, an event of date ``d``
is never later (in original time) than any event of a later date: a run for ``d``
never sees the future.

Everything here is pure arithmetic on counts and dates; the data is held elsewhere.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dayloop.config import parse_day
from dayloop.errors import DataUnavailable

SORT_KEYS = ("ts", "user_id", "item_id")
_DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class ReplayCalendar:
    """Map logical dates to slices ``[lo, hi)`` of a sorted event log of ``n_events``."""

    n_events: int
    events_per_day: int
    replay_days: int
    replay_start: dt.date

    def __post_init__(self) -> None:
        if self.events_per_day <= 0 or self.replay_days <= 0:
            raise ValueError(
                f"events_per_day and replay_days must be positive, got "
                f"{self.events_per_day} and {self.replay_days}"
            )
        needed = self.events_per_day * self.replay_days
        if self.n_events < needed:
            raise ValueError(
                f"{self.n_events} events cannot fill {self.replay_days} replay days of "
                f"{self.events_per_day} events ({needed} needed)"
            )

    # ----- shape ---------------------------------------------------------------
    @property
    def n_history_events(self) -> int:
        """Events before replay day 0."""
        return self.n_events - self.events_per_day * self.replay_days

    @property
    def n_history_days(self) -> int:
        """History days, the earliest possibly short (ceil division)."""
        return -(-self.n_history_events // self.events_per_day)

    @property
    def first_day(self) -> dt.date:
        """Earliest logical date with data."""
        return self.replay_start - dt.timedelta(days=self.n_history_days)

    @property
    def last_day(self) -> dt.date:
        """Last logical date with data (replay day ``replay_days - 1``)."""
        return self.replay_start + dt.timedelta(days=self.replay_days - 1)

    @property
    def history_days(self) -> list[dt.date]:
        """Dates before replay day 0, oldest first."""
        return [self.first_day + dt.timedelta(days=i) for i in range(self.n_history_days)]

    @property
    def replay_dates(self) -> list[dt.date]:
        """Replay dates ``replay_start .. last_day``."""
        return [self.replay_start + dt.timedelta(days=i) for i in range(self.replay_days)]

    # ----- mapping ---------------------------------------------------------------
    def _range_message(self) -> str:
        return (
            f"valid dates are {self.first_day} .. {self.last_day} "
            f"(history {self.first_day} .. {self.replay_start - dt.timedelta(days=1)}, "
            f"replay {self.replay_start} .. {self.last_day})"
        )

    def day_index(self, ds: dt.date | str) -> int:
        """Replay index of ``ds`` (0 = replay_start, negative = history)."""
        ds = parse_day(ds)
        index = (ds - self.replay_start).days
        if not -self.n_history_days <= index < self.replay_days:
            raise DataUnavailable(f"no data for {ds}: {self._range_message()}")
        return index

    def ds_for(self, index: int) -> dt.date:
        """Logical date of replay index ``index``."""
        if not -self.n_history_days <= index < self.replay_days:
            raise DataUnavailable(
                f"no replay day {index}: valid indices are {-self.n_history_days} .. "
                f"{self.replay_days - 1}; {self._range_message()}"
            )
        return self.replay_start + dt.timedelta(days=index)

    def event_slice(self, index: int) -> tuple[int, int]:
        """``(lo, hi)`` positions in the sorted log for replay index ``index``."""
        self.ds_for(index)  # range check
        lo = self.n_history_events + index * self.events_per_day
        return max(lo, 0), lo + self.events_per_day


class CalendarDays:
    """The date properties of a world that replays through ``self.calendar``.

    A mixin for the World classes: each sets ``calendar`` in its constructor and gets
    ``first_day``, ``last_day``, ``history_days`` and ``day_index`` from it.
    """

    calendar: ReplayCalendar

    @property
    def first_day(self) -> dt.date:
        return self.calendar.first_day

    @property
    def last_day(self) -> dt.date:
        return self.calendar.last_day

    @property
    def history_days(self) -> list[dt.date]:
        return self.calendar.history_days

    def day_index(self, ds: dt.date) -> int:
        """Replay index of ``ds``; raises DataUnavailable outside the world's dates (the data)."""
        return self.calendar.day_index(ds)


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Sort by ``(ts, user_id, item_id)`` (stable, total) and reset the index."""
    return events.sort_values(list(SORT_KEYS), kind="mergesort").reset_index(drop=True)


def retime(n: int, ds: dt.date) -> pd.DatetimeIndex:
    """``n`` increasing UTC timestamps (microseconds) inside ``[ds, ds + 1 day)``, linear in rank."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    start_us = int(pd.Timestamp(ds, tz="UTC").value // 1000)
    # rank * DAY / n < DAY for every rank < n, so the last event stays inside the day.
    offsets = (np.arange(n, dtype=np.int64) * _DAY_US) // max(n, 1)
    return pd.DatetimeIndex(
        pd.to_datetime(start_us + offsets, unit="us", utc=True)
    ).astype("datetime64[us, UTC]")
