"""The one schema every data source lands in (MovieLens replay and synthetic world).

Landing zone layout under ``Settings.landing_dir``::

    interactions/ds=YYYY-MM-DD/part-00000.parquet   one partition per logical day
    users.parquet                                    user dimension (static snapshot)
    items.parquet                                    item dimension (static snapshot)

Quarantine mirrors it under ``Settings.quarantine_dir``::

    interactions/ds=YYYY-MM-DD/part-00000.parquet + validation.json
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

# column -> pandas dtype as written to Parquet
INTERACTION_COLUMNS: dict[str, str] = {
    "user_id": "int64",
    "item_id": "int64",
    "rating": "int64",  # 1..5 explicit rating (implicit positive for retrieval)
    "ts": "datetime64[us, UTC]",  # event time, inside the partition's logical day
}

USER_COLUMNS: dict[str, str] = {
    "user_id": "int64",
    "gender": "object",  # 'M' / 'F'
    "age": "int64",  # MovieLens age bucket code (1, 18, 25, 35, 45, 50, 56)
    "occupation": "int64",  # 0..20
}

ITEM_COLUMNS: dict[str, str] = {
    "item_id": "int64",
    "title": "object",
    "year": "int64",  # release year
    "genres": "object",  # pipe-separated genre names, e.g. "Action|Comedy"
}

RATING_MIN, RATING_MAX = 1, 5
PART_NAME = "part-00000.parquet"


def partition_dir(root: Path, ds: dt.date) -> Path:
    """``<root>/interactions/ds=YYYY-MM-DD``."""
    return Path(root) / "interactions" / f"ds={ds.isoformat()}"


def partition_file(root: Path, ds: dt.date) -> Path:
    return partition_dir(root, ds) / PART_NAME


def users_file(root: Path) -> Path:
    return Path(root) / "users.parquet"


def items_file(root: Path) -> Path:
    return Path(root) / "items.parquet"
