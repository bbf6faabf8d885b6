"""The gate's user holdout: recent days of a fixed share of users that no model trains on.

One held-out day (``eval.parquet``, ~105 MovieLens users) leaves the offline gate with
about +/-30 % relative noise on NDCG@10, so a retrain with another seed can flip its
decision. The held-out day cannot be widened without hiding the last days from every
user's training. Instead a fixed share of users (chosen by a hash of the user id, the
same users on every day and in every model version) have their events of the last
``days`` days of the window left out of training; the gate evaluates those users on
their last active day of that span in addition to the held-out day's users.

Both champion and challenger were trained without those events (the champion's window
ends earlier, and its own held-out span covers the rest), so the pooled comparison is as
leak-free as the held-out day itself. Pure numpy/pandas; no model code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

META_KEY = "gate_holdout"
# Knuth's multiplicative hash: spreads consecutive ids evenly, identical in every process
_HASH_MULT = 2654435761
_HASH_MOD = 2**32


@dataclass(frozen=True)
class HoldoutSpec:
    """Which events are held out: the last ``days`` days before ``window_end`` of users
    whose id hashes below ``share``. ``share == 0`` or ``days == 0`` holds out nothing."""

    days: int
    share: float

    def __post_init__(self) -> None:
        if int(self.days) < 0:
            raise ValueError(f"holdout days must be >= 0, got {self.days}")
        if not 0.0 <= float(self.share) < 1.0:
            raise ValueError(f"holdout share must be in [0, 1), got {self.share}")

    @property
    def active(self) -> bool:
        return self.days > 0 and self.share > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> HoldoutSpec | None:
        """The spec a bundle's model_meta.json records, None for bundles without one."""
        raw = meta.get(META_KEY)
        if not isinstance(raw, dict):
            return None
        try:
            return cls(days=int(raw["days"]), share=float(raw["share"]))
        except (KeyError, TypeError, ValueError):
            return None


def held_out_users(user_ids: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask: which user ids belong to the held-out share (a fixed hash of the id)."""
    ids = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    bucket = (ids * np.uint64(_HASH_MULT)) % np.uint64(_HASH_MOD)
    return bucket.astype(np.float64) / _HASH_MOD < float(share)


def held_out_rows(train_df: pd.DataFrame, window_end: pd.Timestamp, spec: HoldoutSpec) -> np.ndarray:
    """Boolean mask over ``train_df`` rows: the events no model may train on."""
    if not spec.active or len(train_df) == 0:
        return np.zeros(len(train_df), dtype=bool)
    start = window_end - pd.Timedelta(days=int(spec.days))
    recent = (train_df["ts"] >= start).to_numpy()
    return recent & held_out_users(train_df["user_id"].to_numpy(np.int64), spec.share)


def holdout_eval_frame(
    train_df: pd.DataFrame, window_end: pd.Timestamp, spec: HoldoutSpec, history_length: int
) -> pd.DataFrame:
    """Eval rows (``user_id, hist, seen, targets`` as in eval.parquet) of the held-out users.

    One row per held-out user: their last active day in the held-out span, with the
    history as of the start of that day (the ``hist`` of their first event that day),
    ``seen`` = every item they touched before that day in the window, ``targets`` = the
    distinct items of that day. Sorted by user_id; empty when nothing is held out.
    """
    columns = ["user_id", "hist", "seen", "targets"]
    mask = held_out_rows(train_df, window_end, spec)
    if not mask.any():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns}).astype({"user_id": "int64"})
    held = train_df.loc[mask, ["user_id", "item_id", "ts", "hist"]]
    day = held["ts"].dt.floor("D")
    last_day = day.groupby(held["user_id"]).transform("max")
    on_day = held[day == last_day].sort_values(["user_id", "ts", "item_id"], kind="stable")
    first = on_day.groupby("user_id", sort=True).head(1).set_index("user_id")
    targets = on_day.groupby("user_id", sort=True)["item_id"].agg(lambda s: np.unique(s.to_numpy(np.int64)))
    users = first.index.to_numpy(np.int64)
    day_start = first["ts"].dt.floor("D")
    user_rows = train_df[train_df["user_id"].isin(users)]
    before = user_rows.merge(day_start.rename("day_start").reset_index(), on="user_id")
    before = before[before["ts"] < before["day_start"]]
    seen = before.groupby("user_id")["item_id"].agg(lambda s: np.unique(s.to_numpy(np.int64)))
    empty = np.empty(0, dtype=np.int64)
    return pd.DataFrame(
        {
            "user_id": users,
            "hist": [np.asarray(h if h is not None else empty, np.int64)[:history_length] for h in first["hist"]],
            "seen": [seen.get(u, empty) for u in users],
            "targets": [targets[u] for u in users],
        }
    )


def pooled_eval_frame(
    eval_df: pd.DataFrame, train_df: pd.DataFrame, window_end: pd.Timestamp, spec: HoldoutSpec,
    history_length: int,
) -> tuple[pd.DataFrame, int]:
    """eval.parquet's users plus the held-out users not active on the held-out day.

    Returns (frame sorted by user_id, number of rows added from the holdout). A user in
    both keeps their eval.parquet row (the held-out day is the freshest evidence).
    """
    extra = holdout_eval_frame(train_df, window_end, spec, history_length)
    extra = extra[~extra["user_id"].isin(eval_df["user_id"])]
    if extra.empty:
        return eval_df.sort_values("user_id", kind="stable").reset_index(drop=True), 0
    cols = ["user_id", "hist", "seen", "targets"]
    pooled = pd.concat([eval_df[cols], extra[cols]], ignore_index=True)
    return pooled.sort_values("user_id", kind="stable").reset_index(drop=True), int(len(extra))
