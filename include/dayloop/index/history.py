"""The history an index is built with: every (user, item) the loop had accepted by the
version's last day, written beside the index as its seen-items file.

Serving drops these items from a user's list (``serving.index_service.seen`` holds the file
format, the index service the filter). The offline evaluation excludes the user's items
inside the training window (``eval.parquet``'s ``seen``); that alone is not enough online:
on real MovieLens-1M at replay day 0, a simulator panel user's median history is 69
items of which only 3 fall inside the 60-day window, and 15.4 % of the popularity top-10
left after removing the window's items are movies those users had rated before the window.
So the history here is the union of

* the feature set's own interactions: ``train.parquet`` (the window, days < ds) and
  ``eval.parquet``'s targets (day ds): at least what the offline evaluation removes;
* every landed partition up to and including ds (``landing/interactions``): the history
  before the window. Quarantined days are not there: the loop never accepted them.

Its last day is ds: the partition the version was gated on, landed before it was built.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dayloop.config import Settings, parse_day
from dayloop.errors import DataUnavailable


@dataclass(frozen=True)
class SeenHistory:
    """Distinct (user, item) pairs in CSR form (``serving.index_service.seen`` layout)."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    last_day: str
    landed_days: int  # landing partitions read
    first_day: str | None  # the oldest of them

    def meta(self, fingerprint: str) -> dict[str, object]:
        """The ``seen_items`` object of ``index_meta.json`` for the file with sha256 ``fingerprint``."""
        from serving.index_service.seen import SEEN_FILE

        return {
            "file": SEEN_FILE,
            "fingerprint": fingerprint,
            "last_day": self.last_day,
            "first_day": self.first_day,
            "n_users": int(self.user_ids.size),
            "n_pairs": int(self.items.size),
            "landed_days": self.landed_days,
        }


def _id_columns(path: Path, user_col: str, item_col: str) -> tuple[np.ndarray, np.ndarray]:
    """Two id columns of a Parquet file as int64, rows with a null in either dropped."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[user_col, item_col])
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors derive from these
        raise DataUnavailable(f"cannot read {user_col}/{item_col} from {path}: {exc}") from exc
    if item_col != "item_id":  # a list column (eval.parquet's targets): one row per item
        users = pc.list_parent_indices(table[item_col])
        table = table.take(users).select([user_col]).append_column(item_col, pc.list_flatten(table[item_col]))
    table = table.drop_null()
    try:
        users = table[user_col].cast("int64").to_numpy()
        items = table[item_col].cast("int64").to_numpy()
    except (ValueError, TypeError) as exc:
        raise DataUnavailable(f"{path}: {user_col}/{item_col} are not integer ids: {exc}") from exc
    return users, items


def _landed_through(settings: Settings, ds: dt.date) -> list[Path]:
    from dayloop.data.landing import landed_days
    from dayloop.data.schema import partition_file

    return [partition_file(settings.landing_dir, d) for d in landed_days(settings) if d <= ds]


def collect_seen(settings: Settings, ds: dt.date | str, features_path: Path | str) -> SeenHistory:
    """Every (user, item) accepted by day ``ds``: the feature set's window and day plus the
    landed partitions up to ``ds`` (rows with a null or negative id dropped)."""
    from dayloop.features.schema import load_meta, table_file
    from serving.index_service.seen import csr_from_pairs

    ds = parse_day(ds)
    features_path = Path(features_path)
    built_for = load_meta(features_path).get("ds")
    if built_for != ds.isoformat():
        raise ValueError(f"the feature set at {features_path} is for {built_for}, not {ds.isoformat()}")
    parts = [
        _id_columns(features_path / table_file("train"), "user_id", "item_id"),
        _id_columns(features_path / table_file("eval"), "user_id", "targets"),
    ]
    landed = _landed_through(settings, ds)
    parts += [_id_columns(p, "user_id", "item_id") for p in landed]
    users = np.concatenate([u for u, _ in parts])
    items = np.concatenate([i for _, i in parts])
    valid = (users >= 0) & (items >= 0)
    user_ids, offsets, seen_items = csr_from_pairs(users[valid], items[valid])
    first = landed[0].parent.name.removeprefix("ds=") if landed else None
    return SeenHistory(user_ids, offsets, seen_items, ds.isoformat(), len(landed), first)
