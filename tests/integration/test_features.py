"""The PySpark feature job against a small hand-made landing zone (real local Spark).

Expected values come from an independent pure-Python oracle over the same landed
rows, never from the job itself. One JVM serves the module: the first session pays
for it, later per-call sessions start in well under a second.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dayloop.config import Settings
from dayloop.data.schema import items_file, partition_file, users_file
from dayloop.errors import DataUnavailable
from dayloop.features.build import FeatureSetInfo, build_features
from dayloop.features.schema import (
    FEATURE_SCHEMA,
    META_FILE,
    feature_dir,
    feature_schema_hash,
    load_feature_table,
    load_meta,
)

pytestmark = pytest.mark.integration

DS = dt.date(2026, 3, 10)
W = 5  # training window: 03-05 .. 03-09
L = 3
MISSING_DAY = dt.date(2026, 3, 7)
BEFORE_WINDOW = DS - dt.timedelta(days=W + 1)
NEXT_DAY = DS + dt.timedelta(days=1)
DAY_AFTER = DS + dt.timedelta(days=2)

# Marker ids that must never reach any output table.
OLD_ITEM, FUTURE_ITEM, MISPLACED_ITEM, NULL_USER_ITEM = 900001, 900002, 900003, 900004
FUTURE_USER = 777777
COLD_USER = 6  # active on DS only: no history
UNKNOWN_USER = 7  # active but absent from users.parquet
UNKNOWN_ITEM = 13  # interacted but absent from items.parquet
TIE_SECOND = 43207
TABLE_FILES = [f"{name}.parquet" for name in FEATURE_SCHEMA] + [META_FILE]


# ----- landing zone helpers ---------------------------------------------------------------


def _ts(day: dt.date, seconds: int) -> pd.Timestamp:
    return pd.Timestamp(day.isoformat(), tz="UTC") + pd.Timedelta(seconds=int(seconds))


def _events(rows: list[tuple]) -> pd.DataFrame:
    """(user_id, item_id, ts) tuples -> a frame typed as data/schema.py says."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    # A null key (planted on purpose) needs the nullable integer dtype.
    user_dtype = "Int64" if df["user_id"].isna().any() else "int64"
    return pd.DataFrame(
        {
            "user_id": df["user_id"].astype(user_dtype),
            "item_id": df["item_id"].astype("int64"),
            "rating": np.full(len(df), 4, dtype="int64"),
            "ts": pd.to_datetime(df["ts"], utc=True).astype("datetime64[us, UTC]"),
        }
    )


def _make_world(seed: int = 11) -> dict:
    """Every landed frame of the test world, keyed by day (events) or name (dimensions)."""
    rng = np.random.default_rng(seed)
    days: dict[dt.date, list[tuple]] = {}
    for k in range(W, 0, -1):
        day = DS - dt.timedelta(days=k)
        if day == MISSING_DAY:
            continue
        # Half-hour slots make same-timestamp ties common, within and across users.
        days[day] = [
            (
                int(rng.choice([1, 2, 3, 4, 5, UNKNOWN_USER])),
                int(rng.integers(1, 14)),
                _ts(day, int(rng.integers(0, 48)) * 1800),
            )
            for _ in range(30)
        ]
    tie_day = DS - dt.timedelta(days=2)
    # Off the half-hour grid, so no random event shares these timestamps.
    days[tie_day] += [
        (1, 9, _ts(tie_day, TIE_SECOND)),
        (1, 4, _ts(tie_day, TIE_SECOND)),
        (1, 4, _ts(tie_day, TIE_SECOND)),  # exact duplicate event
        (1, 11, _ts(tie_day, TIE_SECOND + 1)),
        (2, MISPLACED_ITEM, _ts(DS, 43200)),  # ts on the held-out day, wrong partition
    ]
    last_day = DS - dt.timedelta(days=1)
    days[last_day].append((None, NULL_USER_ITEM, _ts(last_day, 60)))
    days[DS] = [
        (1, 3, _ts(DS, 100)),
        (1, 5, _ts(DS, 200)),
        (1, 3, _ts(DS, 300)),
        (2, 12, _ts(DS, 400)),
        (UNKNOWN_USER, UNKNOWN_ITEM, _ts(DS, 500)),
        (COLD_USER, 8, _ts(DS, 600)),
        (COLD_USER, 1, _ts(DS, 600)),
    ]
    days[BEFORE_WINDOW] = [(1, OLD_ITEM, _ts(BEFORE_WINDOW, 10))]
    days[NEXT_DAY] = [
        (FUTURE_USER, FUTURE_ITEM, _ts(NEXT_DAY, 10)),
        (1, FUTURE_ITEM, _ts(NEXT_DAY, 20)),
    ]
    users = pd.DataFrame(
        {
            "user_id": np.array([1, 2, 3, 4, 5, 6, 8], dtype="int64"),
            "gender": ["M", "F", "M", "F", "M", "M", "F"],
            "age": np.array([25, 18, 56, 35, 25, 1, 45], dtype="int64"),
            "occupation": np.array([4, 0, 20, 7, 4, 10, 7], dtype="int64"),
        }
    )
    genres = [
        "Comedy|Drama", "Action", "Drama|Romance|Comedy", "", "Sci-Fi|Action", "Film-Noir",
        "Drama", "Children's|Comedy", "Thriller", "War|Drama", "Western", "Comedy",
    ]  # fmt: skip
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, 13, dtype="int64"),
            "title": [f"Movie {i}" for i in range(1, 13)],
            "year": np.array(
                [1995, 1999, 1972, 2000, 1968, 1944, 1995, 1989, 1990, 1957, 1931, 0],
                dtype="int64",
            ),
            "genres": genres,
        }
    )
    return {"days": {d: _events(rows) for d, rows in days.items()}, "users": users, "items": items}


def _land(home: Path, world: dict, shuffle_seed: int | None = None) -> Settings:
    """Write ``world`` under ``home/landing``; optionally shuffle every file's row order."""
    settings = Settings(home=home, data_cache=home / "cache", train_window_days=W, history_length=L)
    landing = settings.landing_dir

    def order(df: pd.DataFrame) -> pd.DataFrame:
        if shuffle_seed is None:
            return df
        return df.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)

    for day, df in world["days"].items():
        path = partition_file(landing, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        order(df).to_parquet(path, index=False)
    # A later partition that is not even Parquet: reading it would fail the build.
    corrupt = partition_file(landing, DAY_AFTER)
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"this is not parquet")
    order(world["users"]).to_parquet(users_file(landing), index=False)
    order(world["items"]).to_parquet(items_file(landing), index=False)
    return settings


# ----- independent oracle -----------------------------------------------------------------


def _usable(world: dict, days: list[dt.date]) -> pd.DataFrame:
    frames = []
    for day in days:
        if day not in world["days"]:
            continue
        df = world["days"][day].copy()
        df = df[df["user_id"].notna()]
        df = df[df["ts"].dt.date == day]
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["user_id"] = out["user_id"].astype("int64")
    return out


def _window(world: dict) -> list[dt.date]:
    return [DS - dt.timedelta(days=k) for k in range(W, 0, -1)]


def _oracle_train(world: dict) -> list[tuple]:
    ev = _usable(world, _window(world))
    rows = []
    for user, grp in ev.groupby("user_id"):
        history = sorted(zip(grp["ts"], grp["item_id"]), reverse=True)  # newest first
        for ts, item in zip(grp["ts"], grp["item_id"]):
            hist = [i for t, i in history if t < ts][:L]
            rows.append((int(user), pd.Timestamp(ts), int(item), tuple(int(i) for i in hist)))
    return sorted(rows)


def _oracle_eval(world: dict) -> dict[int, tuple]:
    before = _usable(world, _window(world))
    held = _usable(world, [DS])
    out = {}
    for user, grp in held.groupby("user_id"):
        mine = before[before["user_id"] == user]
        history = sorted(zip(mine["ts"], mine["item_id"]), reverse=True)
        out[int(user)] = (
            tuple(int(i) for _, i in history[:L]),
            tuple(sorted({int(i) for i in mine["item_id"]})),
            tuple(sorted({int(i) for i in grp["item_id"]})),
        )
    return out


# ----- fixtures ---------------------------------------------------------------------------


def _snapshot(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in TABLE_FILES}


@pytest.fixture(scope="module")
def world() -> dict:
    return _make_world()


@pytest.fixture(scope="module")
def built(tmp_path_factory, world) -> tuple[Settings, FeatureSetInfo, dict[str, bytes]]:
    settings = _land(tmp_path_factory.mktemp("home"), world)
    info = build_features(DS, settings)
    return settings, info, _snapshot(info.path)


def _as_tuple(values) -> tuple:
    return tuple(int(v) for v in values)


# ----- tests ------------------------------------------------------------------------------


def test_train_rows_and_history_match_point_in_time_oracle(built, world):
    _, info, _ = built
    train = load_feature_table(info.path, "train")
    actual = [
        (int(r.user_id), pd.Timestamp(r.ts), int(r.item_id), _as_tuple(r.hist))
        for r in train.itertuples()
    ]
    assert sorted(actual) == _oracle_train(world)
    assert info.n_train == len(train)
    # The file itself is ordered by (user_id, ts, item_id).
    keys = list(zip(train["user_id"], train["ts"], train["item_id"]))
    assert keys == sorted(keys)


def test_no_history_item_is_at_or_after_the_row(built, world):
    _, info, _ = built
    train = load_feature_table(info.path, "train")
    ev = _usable(world, _window(world))
    first_seen = ev.groupby(["user_id", "item_id"])["ts"].min().to_dict()
    checked = 0
    for r in train.itertuples():
        assert len(r.hist) <= L
        for item in r.hist:
            assert first_seen[(r.user_id, int(item))] < r.ts
            checked += 1
    assert checked > 0
    # Same-timestamp events never see each other: the tie at 12:00 on the tie day.
    tie_ts = _ts(DS - dt.timedelta(days=2), TIE_SECOND)
    tied = train[(train["user_id"] == 1) & (train["ts"] == tie_ts)]
    assert sorted(tied["item_id"]) == [4, 4, 9]
    assert len({_as_tuple(h) for h in tied["hist"]}) == 1
    after = train[(train["user_id"] == 1) & (train["ts"] == tie_ts + pd.Timedelta(seconds=1))]
    assert _as_tuple(after["hist"].iloc[0])[:3] == (9, 4, 4)  # (ts, item_id) desc


def test_eval_matches_oracle_and_never_leaks_into_train(built, world):
    _, info, _ = built
    ev = load_feature_table(info.path, "eval")
    actual = {
        int(r.user_id): (_as_tuple(r.hist), _as_tuple(r.seen), _as_tuple(r.targets))
        for r in ev.itertuples()
    }
    expected = _oracle_eval(world)
    assert actual == expected
    assert info.n_eval_users == len(expected)
    assert actual[COLD_USER] == ((), (), (1, 8))
    train = load_feature_table(info.path, "train")
    assert train["ts"].max() < pd.Timestamp(DS.isoformat(), tz="UTC")
    held = _usable(world, [DS])
    train_keys = set(zip(train["user_id"], train["item_id"], train["ts"]))
    assert not train_keys & set(zip(held["user_id"], held["item_id"], held["ts"]))


def test_later_partitions_are_never_read(built):
    # DAY_AFTER holds a corrupt file: the build above succeeded, so it was never opened.
    _, info, _ = built
    markers = {FUTURE_ITEM, MISPLACED_ITEM, NULL_USER_ITEM}
    for name, cols in {
        "train": ["item_id", "hist"],
        "eval": ["hist", "seen", "targets"],
        "items": ["item_id"],
        "popularity": ["item_id"],
    }.items():
        df = load_feature_table(info.path, name)
        for col in cols:
            values = df[col].explode() if df[col].dtype == object else df[col]
            assert not markers & {int(v) for v in values.dropna()}, (name, col)
    users = load_feature_table(info.path, "users")
    assert FUTURE_USER not in set(users["user_id"])
    assert NEXT_DAY.isoformat() not in load_meta(info.path)["source_days"]


def test_window_bounds(built, world):
    _, info, _ = built
    meta = load_meta(info.path)
    assert info.window_start == DS - dt.timedelta(days=W)
    assert info.window_end == DS
    assert (meta["window_start"], meta["window_end"], meta["ds"]) == (
        str(DS - dt.timedelta(days=W)),
        str(DS),
        str(DS),
    )
    train = load_feature_table(info.path, "train")
    days = set(train["ts"].dt.date)
    assert min(days) == DS - dt.timedelta(days=W)
    assert max(days) == DS - dt.timedelta(days=1)
    assert OLD_ITEM not in set(train["item_id"])
    pop = load_feature_table(info.path, "popularity")
    expected = _usable(world, _window(world))["item_id"].value_counts().to_dict()
    assert dict(zip(pop["item_id"].astype(int), pop["count"].astype(int))) == expected


def test_missing_days_are_listed(built):
    _, info, _ = built
    assert info.missing_days == (MISSING_DAY,)
    assert load_meta(info.path)["missing_days"] == [MISSING_DAY.isoformat()]


def test_schema_matches_contract_and_hash_is_recorded(built):
    settings, info, _ = built
    arrow = {
        "int64": pa.int64(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        "list<int64>": pa.list_(pa.int64()),
    }
    for name, columns in FEATURE_SCHEMA.items():
        schema = pq.read_schema(info.path / f"{name}.parquet")
        assert schema.names == list(columns), name
        for col, typ in columns.items():
            actual = schema.field(col).type
            if typ.startswith("list"):
                assert pa.types.is_list(actual) and actual.value_type == pa.int64(), (name, col)
            else:
                assert actual == arrow[typ], (name, col, actual)
    meta = load_meta(info.path)
    assert meta["feature_schema"] == FEATURE_SCHEMA
    assert meta["feature_schema_hash"] == feature_schema_hash(L) == info.feature_schema_hash
    assert meta["history_length"] == L
    assert meta["n_train"] == info.n_train and meta["n_eval_users"] == info.n_eval_users
    assert sorted(p.name for p in info.path.iterdir()) == sorted(TABLE_FILES)
    assert info.path == feature_dir(settings.features_dir, DS)


def test_vocabularies_and_codes(built, world):
    _, info, _ = built
    meta = load_meta(info.path)
    users_dim, items_dim = world["users"], world["items"]
    assert meta["gender_vocab"] == ["F", "M"]
    assert meta["age_vocab"] == sorted(set(users_dim["age"]))
    assert meta["occupation_vocab"] == sorted(set(users_dim["occupation"]))
    expected_genres = sorted({g for s in items_dim["genres"] for g in s.split("|") if g})
    assert meta["genre_vocab"] == expected_genres
    assert meta["year_buckets"] == sorted({y - y % 10 for y in items_dim["year"] if y > 0})
    assert meta["cardinalities"]["genre_ids"] == len(expected_genres) + 1

    users = load_feature_table(info.path, "users").set_index("user_id")
    for r in users_dim.itertuples():
        assert users.loc[r.user_id, "gender_idx"] == meta["gender_vocab"].index(r.gender) + 1
        assert users.loc[r.user_id, "age_idx"] == meta["age_vocab"].index(r.age) + 1
        occupation = meta["occupation_vocab"].index(r.occupation) + 1
        assert users.loc[r.user_id, "occupation_idx"] == occupation
    assert users.loc[UNKNOWN_USER].tolist() == [0, 0, 0]

    items = load_feature_table(info.path, "items").set_index("item_id")
    for r in items_dim.itertuples():
        want = sorted(meta["genre_vocab"].index(g) + 1 for g in r.genres.split("|") if g)
        assert _as_tuple(items.loc[r.item_id, "genre_ids"]) == tuple(want)
        bucket = meta["year_buckets"].index(r.year - r.year % 10) + 1 if r.year > 0 else 0
        assert items.loc[r.item_id, "year_idx"] == bucket
    assert items.loc[UNKNOWN_ITEM, "year_idx"] == 0
    assert len(items.loc[UNKNOWN_ITEM, "genre_ids"]) == 0


def test_row_order_of_inputs_changes_nothing(built, world, tmp_path):
    _, info, first = built
    shuffled = _land(tmp_path / "shuffled", world, shuffle_seed=5)
    other = build_features(DS, shuffled)
    assert _snapshot(other.path) == first


def test_rebuild_is_idempotent_and_leaves_no_temp_dirs(built):
    settings, info, first = built
    again = build_features(DS, settings)
    assert again == info
    assert _snapshot(again.path) == first
    assert [p.name for p in settings.features_dir.iterdir()] == [info.path.name]


def test_missing_heldout_day_raises_and_writes_nothing(built):
    settings, _, _ = built
    with pytest.raises(DataUnavailable, match="held-out partition for 2026-03-07 is missing"):
        build_features(MISSING_DAY, settings)
    assert not feature_dir(settings.features_dir, MISSING_DAY).exists()


def test_empty_window_raises(tmp_path, world):
    lonely = {"days": {DS: world["days"][DS]}, "users": world["users"], "items": world["items"]}
    settings = _land(tmp_path, lonely)
    with pytest.raises(DataUnavailable, match="training window .* is empty"):
        build_features(DS, settings)
    assert not settings.features_dir.exists() or not any(settings.features_dir.iterdir())


def test_unusable_heldout_day_fails_without_touching_the_published_set(tmp_path, world):
    days = dict(world["days"])
    # The held-out partition only holds an event stamped on another day.
    days[DS] = _events([(1, 2, _ts(DS - dt.timedelta(days=1), 5))])
    settings = _land(tmp_path, {**world, "days": days})
    target = feature_dir(settings.features_dir, DS)
    target.mkdir(parents=True)
    (target / "sentinel").write_text("previous run")
    with pytest.raises(DataUnavailable, match="no usable interactions"):
        build_features(DS, settings)
    assert [p.name for p in settings.features_dir.iterdir()] == [target.name]
    assert (target / "sentinel").read_text() == "previous run"


def test_spark_session_nests_and_stops():
    from pyspark.sql import SparkSession

    from dayloop.features.spark import spark_session

    with spark_session(app_name="outer") as outer:
        assert outer.conf.get("spark.sql.session.timeZone") == "UTC"
        assert outer.conf.get("spark.sql.shuffle.partitions") == "4"
        with spark_session(app_name="inner") as inner:
            assert inner.sparkContext is outer.sparkContext
            assert inner.range(3).count() == 3
        assert outer.range(5).count() == 5  # the inner exit left the owner running
    assert SparkSession.getActiveSession() is None
