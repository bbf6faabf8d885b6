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
