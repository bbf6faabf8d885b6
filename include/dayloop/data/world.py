"""One interface over the data sources: the MovieLens replay and the synthetic world."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import pandas as pd

from dayloop.config import Settings
from dayloop.data.replay import CalendarDays, ReplayCalendar, retime, sort_events


@runtime_checkable
class World(Protocol):
    """A source of users, items and one day of interactions at a time (landing schema)."""

    def users(self) -> pd.DataFrame: ...

    def items(self) -> pd.DataFrame: ...

    def interactions(self, ds: dt.date) -> pd.DataFrame:
        """Events of logical date ``ds``, sorted by ts; DataUnavailable outside the data."""
        ...

    def day_index(self, ds: dt.date) -> int: ...

    @property
    def first_day(self) -> dt.date: ...

    @property
    def last_day(self) -> dt.date: ...

    @property
    def history_days(self) -> list[dt.date]: ...


class _MovieLensData:
    """The parsed dataset with ratings sorted by (ts, user_id, item_id)."""

    def __init__(self, path: Path) -> None:
        from dayloop.data.movielens import load_movielens

        users, items, ratings = load_movielens(path)
        self.users = users
        self.items = items
        self.events = sort_events(ratings)


_ML_CACHE: dict[Path, _MovieLensData] = {}
_ML_LOCK = threading.Lock()


def _movielens_data(path: Path) -> _MovieLensData:
    """Parse the files once per process (a second parse would cost ~1 s and ~60 MB)."""
    key = Path(path).resolve()
    with _ML_LOCK:
        data = _ML_CACHE.get(key)
        if data is None:
            data = _ML_CACHE[key] = _MovieLensData(key)
        return data


class MovieLensWorld(CalendarDays):
    """MovieLens-1M replayed through a ReplayCalendar (its dates: CalendarDays)."""

    def __init__(self, settings: Settings, fetch: bool = True) -> None:
        from dayloop.data.movielens import dataset_dir, ensure_movielens, is_present

        if fetch:
            path = ensure_movielens(settings.data_cache)
        else:
            path = dataset_dir(settings.data_cache)
            if not is_present(settings.data_cache):
                from dayloop.data.movielens import MovieLensError

                raise MovieLensError(
                    f"MovieLens-1M is not in {path}; run `python -m dayloop.data.movielens`"
                )
        self._data = _movielens_data(path)
        self.calendar = ReplayCalendar(
            n_events=len(self._data.events),
            events_per_day=settings.events_per_day,
            replay_days=settings.replay_days,
            replay_start=settings.replay_start,
        )

    def users(self) -> pd.DataFrame:
        """User dimension (all 6,040 users)."""
        return self._data.users.copy()

    def items(self) -> pd.DataFrame:
        """Item dimension (all 3,883 movies, including the 177 never rated)."""
        return self._data.items.copy()

    def source_events(self, ds: dt.date) -> pd.DataFrame:
        """The day's slice with the ORIGINAL rating times (for audits and tests)."""
        lo, hi = self.calendar.event_slice(self.calendar.day_index(ds))
        return self._data.events.iloc[lo:hi].reset_index(drop=True)

    def interactions(self, ds: dt.date) -> pd.DataFrame:
        """The day's slice re-timed into ``[ds, ds + 1)`` UTC, in the original order."""
        out = self.source_events(ds)
        out["ts"] = retime(len(out), self.calendar.ds_for(self.calendar.day_index(ds)))
        return out


def open_world(settings: Settings) -> World:
    """The World for ``settings.source`` ('movielens' or 'synthetic')."""
    if settings.source == "movielens":
        return MovieLensWorld(settings)
    if settings.source == "synthetic":
        from dayloop.data.synthetic import SyntheticWorld

        return SyntheticWorld(settings.synthetic, settings.replay_start)
    raise ValueError(f"unknown data source {settings.source!r}; use 'movielens' or 'synthetic'")
