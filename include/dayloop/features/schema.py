"""The feature set the Spark job writes and the trainer reads.

One directory per logical date ``Settings.features_dir / "ds=YYYY-MM-DD"``:

``train.parquet``   one row per interaction in the training window
                    ``[ds - train_window_days, ds)`` (the held-out day ``ds`` is excluded):
                    user_id int64, item_id int64, ts timestamp(UTC),
                    hist list<int64>: the user's last ``history_length`` item ids strictly
                    before ``ts`` (point in time), most recent first.
``eval.parquet``    one row per user active on the held-out day ``ds``:
                    user_id int64,
                    hist list<int64>: last ``history_length`` item ids before the start of ``ds``,
                    seen list<int64>: every item id the user touched before ``ds`` inside the
                    window (to filter from rankings),
                    targets list<int64>: distinct item ids the user touched on ``ds``.
``users.parquet``   user_id int64, gender_idx int64, age_idx int64, occupation_idx int64
                    (1-based codes; 0 means unknown).
``items.parquet``   item_id int64, year_idx int64 (1-based year bucket; 0 unknown),
                    genre_ids list<int64> (1-based genre codes).
``popularity.parquet`` item_id int64, count int64: interactions per item in the window.
``meta.json``       ds, window_start, window_end (exclusive, == ds), history_length,
                    n_train, n_eval_users, genre_vocab, age_vocab, occupation_vocab,
                    year_buckets, feature_schema, feature_schema_hash.
                    Also: gender_vocab, year_bucket_width, cardinalities (embedding-table
                    size per categorical column = len(vocab) + 1 for the 0 slot),
                    vocab_hash, missing_days, n_users, n_items, tables (name -> file).

Each table is ONE Parquet file (not a directory): ``pd.read_parquet(dir / "train.parquet")``
or ``load_feature_table(dir, "train")``. Vocabularies are sorted lists; code ``i`` (1-based)
stands for ``vocab[i - 1]`` and 0 means unknown/missing. ``year_buckets`` are decade starts:
year_idx ``i`` covers ``[year_buckets[i-1], year_buckets[i-1] + year_bucket_width)``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

FEATURE_SCHEMA: dict[str, dict[str, str]] = {
    "train": {"user_id": "int64", "item_id": "int64", "ts": "timestamp", "hist": "list<int64>"},
    "eval": {
        "user_id": "int64",
        "hist": "list<int64>",
        "seen": "list<int64>",
        "targets": "list<int64>",
    },
    "users": {
        "user_id": "int64",
        "gender_idx": "int64",
        "age_idx": "int64",
        "occupation_idx": "int64",
    },
    "items": {"item_id": "int64", "year_idx": "int64", "genre_ids": "list<int64>"},
    "popularity": {"item_id": "int64", "count": "int64"},
}

USER_FEATURE_COLUMNS = ("gender_idx", "age_idx", "occupation_idx")


def feature_schema_hash(history_length: int, schema: dict | None = None) -> str:
    """Stable short hash of the feature schema; a model is only comparable to inputs
    built under the same hash."""
    payload = json.dumps(
        {"schema": schema or FEATURE_SCHEMA, "history_length": history_length}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ----- layout helpers (additive; used by the Spark job and the trainer) ------------------

META_FILE = "meta.json"


def table_file(name: str) -> str:
    """File name of feature table ``name`` inside a feature directory."""
    if name not in FEATURE_SCHEMA:
        raise ValueError(
            f"unknown feature table {name!r}; expected one of {sorted(FEATURE_SCHEMA)}"
        )
    return f"{name}.parquet"


def feature_dir(features_dir: Path, ds: dt.date) -> Path:
    """``<features_dir>/ds=YYYY-MM-DD``."""
    return Path(features_dir) / f"ds={ds.isoformat()}"


def arrow_type_name(arrow_type: "pa.DataType") -> str:
    """Name an Arrow type in FEATURE_SCHEMA's vocabulary (e.g. 'list<int64>')."""
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type):
        # Only UTC instants count as 'timestamp'; a naive or other-zone column is a bug.
        return "timestamp" if arrow_type.tz in ("UTC", "+00:00", "Etc/UTC") else str(arrow_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list<{arrow_type_name(arrow_type.value_type)}>"
    return str(arrow_type)


def schema_problems(name: str, arrow_schema: "pa.Schema") -> list[str]:
    """Every way ``arrow_schema`` differs from FEATURE_SCHEMA[name] (empty when it matches)."""
    expected = FEATURE_SCHEMA[name]
    actual = {field.name: arrow_type_name(field.type) for field in arrow_schema}
    problems = [f"{name}: missing column {col!r}" for col in expected if col not in actual]
    problems += [f"{name}: unexpected column {col!r}" for col in actual if col not in expected]
    problems += [
        f"{name}.{col}: type {actual[col]} != {typ}"
        for col, typ in expected.items()
        if col in actual and actual[col] != typ
    ]
    if not problems and list(actual) != list(expected):
        problems.append(f"{name}: column order {list(actual)} != {list(expected)}")
    return problems


def load_meta(path: Path) -> dict[str, Any]:
    """Read ``meta.json`` of the feature directory ``path``."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no feature set at {path}: {META_FILE} is missing")
    return json.loads(meta_path.read_text())


def load_feature_table(path: Path, name: str) -> "pd.DataFrame":
    """Read feature table ``name`` (train, eval, users, items, popularity) from ``path``.

    List columns come back as numpy arrays per row; ``ts`` as datetime64[us, UTC].
    """
    import pandas as pd

    file = Path(path) / table_file(name)
    if not file.is_file():
        raise FileNotFoundError(f"feature table {name!r} not found at {file}")
    return pd.read_parquet(file)
