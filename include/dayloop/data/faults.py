"""Plant data faults in a day's interactions (tests and demos of the data gate).

Every function takes a frame in the landing schema and returns a NEW frame; the
input is never modified. Randomness is seeded, so a planted fault is reproducible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dayloop.data.schema import RATING_MAX, RATING_MIN


def _check_frac(name: str, value: float, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value}")


def _pick(n: int, frac: float, seed: int) -> np.ndarray:
    """Row positions of a seeded random ``frac`` of ``n`` rows (at least one when n > 0)."""
    k = min(n, max(1, int(round(frac * n)))) if n else 0
    return np.random.default_rng(seed).choice(n, size=k, replace=False)


def drop_column(df: pd.DataFrame, column: str = "rating") -> pd.DataFrame:
    """The frame without ``column`` (a schema break upstream)."""
    if column not in df.columns:
        raise ValueError(f"no column {column!r} to drop; columns are {list(df.columns)}")
    return df.drop(columns=[column])


def null_spike(df: pd.DataFrame, frac: float = 0.2, column: str = "rating",
               seed: int = 0) -> pd.DataFrame:
    """Null out a ``frac`` of ``column`` (ints become float with NaN, timestamps NaT)."""
    _check_frac("frac", frac)
    if column not in df.columns:
        raise ValueError(f"no column {column!r}; columns are {list(df.columns)}")
    out = df.copy()
    rows = _pick(len(out), frac, seed)
    if pd.api.types.is_integer_dtype(out[column].dtype):
        out[column] = out[column].astype("float64")
    out.loc[out.index[rows], column] = None
    return out


def out_of_day_timestamps(df: pd.DataFrame, frac: float = 0.05,
                          shift: pd.Timedelta = pd.Timedelta(days=1), seed: int = 0) -> pd.DataFrame:
    """Move a ``frac`` of events by ``shift`` (default one day later: late-arriving or mis-dated data)."""
    _check_frac("frac", frac)
    out = df.copy()
    rows = out.index[_pick(len(out), frac, seed)]
    out.loc[rows, "ts"] = out.loc[rows, "ts"] + shift
    return out


def volume_drop(df: pd.DataFrame, keep_frac: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """Keep only a random ``keep_frac`` of the rows (a partial extract), order preserved."""
    _check_frac("keep_frac", keep_frac, allow_zero=True)
    if keep_frac == 0:
        return df.iloc[0:0].copy()
    keep = np.sort(_pick(len(df), keep_frac, seed))
    return df.iloc[keep].reset_index(drop=True)


def distribution_drift(df: pd.DataFrame, rating_shift: int = -2, n_items: int = 10,
                       frac: float = 1.0, seed: int = 0) -> pd.DataFrame:
    """Shift ratings by ``rating_shift`` (clipped to 1..5) and pile a ``frac`` of events onto
    ``n_items`` items already present that day (a bot, a broken join, a stuck carousel).

    Ids stay valid and timestamps stay inside the day, so only distribution checks can
    catch it.
    """
    _check_frac("frac", frac)
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    out = df.copy()
    rng = np.random.default_rng(seed)
    rows = out.index[_pick(len(out), frac, seed)]
    present = np.unique(out["item_id"].to_numpy())
    narrow = rng.choice(present, size=min(n_items, len(present)), replace=False)
    out.loc[rows, "item_id"] = rng.choice(narrow, size=len(rows))
    out.loc[rows, "rating"] = np.clip(out.loc[rows, "rating"] + rating_shift, RATING_MIN, RATING_MAX)
    return out


# --------------------------------------------------------------------------- delivery faults
# How deliveries go wrong in production (re-deliveries, partial days, floods, clock faults).
# Each returns the frame sorted by ts, like a landed partition; the day is that of the
# first event's date unless ``day`` is given (events move inside it, never out of it,
# except clock_skew, which pushes them out by design).
_DAY = pd.Timedelta(days=1)


def _day_start(df: pd.DataFrame, day=None) -> pd.Timestamp:
    if day is not None:
        return pd.Timestamp(day, tz="UTC")
    if len(df) == 0:
        raise ValueError("an empty frame has no day; pass day=")
    return df["ts"].min().tz_convert("UTC").floor("D")


def _check_window(start_hour: float, hours: float) -> None:
    if not (0 <= start_hour < 24 and 0 < hours <= 24 - start_hour):
        raise ValueError(f"window must lie inside the day: start_hour in [0, 24) and hours in "
                         f"(0, 24 - start_hour], got {start_hour} and {hours}")


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["ts", "user_id", "item_id"], kind="mergesort").reset_index(drop=True)


def _window(df: pd.DataFrame, start_hour: float, hours: float, day=None) -> np.ndarray:
    start = _day_start(df, day) + pd.Timedelta(hours=start_hour)
    return ((df["ts"] >= start) & (df["ts"] < start + pd.Timedelta(hours=hours))).to_numpy()


def redeliver_slice(df: pd.DataFrame, start_hour: float = 6.0, hours: float = 2.0,
                    restamp: pd.Timedelta | None = None, day=None) -> pd.DataFrame:
    """Append the events of ``[start_hour, start_hour + hours)`` a second time (a batch
    delivered twice). With ``restamp`` the copies are moved by that offset, as when the
    ingest stamps events at delivery time; they stay inside the day (clipped to its end)."""
    _check_window(start_hour, hours)
    again = df[_window(df, start_hour, hours, day)].copy()
    if len(again) == 0:
        raise ValueError(f"no events in the {hours} h from hour {start_hour} to re-deliver")
    if restamp is not None:
        last = _day_start(df, day) + _DAY - pd.Timedelta(microseconds=1)
        again["ts"] = (again["ts"] + restamp).clip(upper=last)
    return _sorted(pd.concat([df, again], ignore_index=True))


def partial_delivery(df: pd.DataFrame, start_hour: float = 0.0, hours: float = 6.0,
                     keep_frac: float = 0.0, seed: int = 0, day=None) -> pd.DataFrame:
    """Keep only a seeded ``keep_frac`` of the events in ``[start_hour, start_hour + hours)``:
    0 leaves a gap (a producer down for hours), more thins the window (a shard lost)."""
    _check_window(start_hour, hours)
    _check_frac("keep_frac", keep_frac, allow_zero=True)
    inside = np.flatnonzero(_window(df, start_hour, hours, day))
    keep = np.ones(len(df), dtype=bool)
    keep[inside] = False
    if keep_frac > 0 and len(inside):
        keep[inside[_pick(len(inside), keep_frac, seed)]] = True
    return df[keep].reset_index(drop=True)


def user_flood(df: pd.DataFrame, frac: float = 0.8, user_id: int | None = None,
               seed: int = 0, day=None) -> pd.DataFrame:
    """Add ``frac * len(df)`` events from one account (default: the day's most active user)
    on items of the day, at seeded times spread over the day (a bot, a stuck producer)."""
    if not frac > 0:
        raise ValueError(f"frac must be > 0, got {frac}")
    if len(df) == 0:
        raise ValueError("cannot flood an empty day")
    rng = np.random.default_rng(seed)
    n = max(1, int(round(frac * len(df))))
    user = int(df["user_id"].value_counts().index[0]) if user_id is None else int(user_id)
    start = _day_start(df, day)
    extra = pd.DataFrame({
        "user_id": np.full(n, user, dtype=np.int64),
        "item_id": rng.choice(df["item_id"].to_numpy(), size=n),
        "rating": rng.choice(df["rating"].to_numpy(), size=n),
        "ts": start + pd.to_timedelta(rng.integers(0, 86_400 * 1_000_000, size=n), unit="us"),
    }).astype(df.dtypes.to_dict())
    return _sorted(pd.concat([df, extra], ignore_index=True))


def user_burst(df: pd.DataFrame, n_events: int = 120, seconds: float = 30.0, at_hour: float = 12.0,
               user_id: int | None = None, seed: int = 0, day=None) -> pd.DataFrame:
    """Add ``n_events`` events from one user within ``seconds`` from ``at_hour`` (a script
    replaying a session, a retry loop), on distinct items of the day where it has enough."""
    if n_events < 1 or not seconds > 0:
        raise ValueError(f"n_events must be >= 1 and seconds > 0, got {n_events} and {seconds}")
    _check_window(at_hour, seconds / 3600)
    rng = np.random.default_rng(seed)
    user = int(df["user_id"].value_counts().index[-1]) if user_id is None else int(user_id)
    items = np.unique(df["item_id"].to_numpy())
    start = _day_start(df, day) + pd.Timedelta(hours=at_hour)
    extra = pd.DataFrame({
        "user_id": np.full(n_events, user, dtype=np.int64),
        "item_id": rng.choice(items, size=n_events, replace=len(items) < n_events),
        "rating": rng.choice(df["rating"].to_numpy(), size=n_events),
        "ts": start + pd.to_timedelta(np.sort(rng.integers(0, int(seconds * 1_000_000), size=n_events)),
                                      unit="us"),
    }).astype(df.dtypes.to_dict())
    return _sorted(pd.concat([df, extra], ignore_index=True))


def timestamp_cluster(df: pd.DataFrame, frac: float = 0.05, at_hour: float = 12.0,
                      seed: int = 0, day=None) -> pd.DataFrame:
    """Stamp a seeded ``frac`` of the events with one exact time, ``at_hour`` (a stuck clock,
    a default timestamp filled in by a broken producer)."""
    _check_frac("frac", frac)
    _check_window(at_hour, 1 / 3600)
    out = df.copy()
    rows = out.index[_pick(len(out), frac, seed)]
    out.loc[rows, "ts"] = _day_start(df, day) + pd.Timedelta(hours=at_hour)
    return _sorted(out)


def clock_skew(df: pd.DataFrame, shift: pd.Timedelta = pd.Timedelta(hours=3), day=None) -> pd.DataFrame:
    """Shift every event by ``shift`` (a producer clock ahead, or behind when negative) and drop
    those pushed out of the day: partitioned by event time, they land in the next (or previous)
    day's partition, so this day loses an edge while its count still looks plausible."""
    if abs(shift) >= _DAY or shift == pd.Timedelta(0):
        raise ValueError(f"shift must be non-zero and shorter than a day, got {shift}")
    start = _day_start(df, day)
    out = df.assign(ts=df["ts"] + shift)
    inside = (out["ts"] >= start) & (out["ts"] < start + _DAY)
    return out[inside].reset_index(drop=True)
