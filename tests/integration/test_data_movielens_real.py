"""The real MovieLens-1M files (fetched into the cache on first use) and their replay."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from dayloop.config import load_settings
from dayloop.data.movielens import ensure_movielens, load_movielens
from dayloop.data.schema import INTERACTION_COLUMNS
from dayloop.data.world import MovieLensWorld, open_world
from dayloop.errors import DataUnavailable

pytestmark = pytest.mark.integration

START = dt.date(2026, 1, 1)


@pytest.fixture(scope="module")
def ml_dir() -> Path:
    return ensure_movielens(load_settings().data_cache)


def test_the_published_dataset_is_what_we_load(ml_dir: Path) -> None:
    users, items, ratings = load_movielens(ml_dir)
    # Published ML-1M figures.
    assert len(ratings) == 1_000_209
    assert ratings["user_id"].nunique() == len(users) == 6_040
    assert ratings["item_id"].nunique() == 3_706
    assert ratings["ts"].min().date() == dt.date(2000, 4, 25)
    assert ratings["ts"].max().date() == dt.date(2003, 2, 28)
    assert not ratings.duplicated(["user_id", "item_id"]).any()
    assert set(users["age"]) == {1, 18, 25, 35, 45, 50, 56}
    assert set(users["gender"]) == {"F", "M"}
    assert items.loc[items["title"] == "Toy Story (1995)", "genres"].item() == "Animation|Children's|Comedy"
    assert ratings["item_id"].isin(items["item_id"]).all()


def test_replay_days_are_full_inside_the_day_and_never_see_the_future(
        ml_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAYLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("DAYLOOP_SOURCE", "movielens")
    monkeypatch.setenv("DAYLOOP_REPLAY_START", START.isoformat())
    monkeypatch.setenv("DAYLOOP_EVENTS_PER_DAY", "5000")
    monkeypatch.setenv("DAYLOOP_REPLAY_DAYS", "30")
    world = open_world(load_settings())
    assert isinstance(world, MovieLensWorld)
    # 850,209 history events in 5,000-event days: 171 days, the first one short.
    assert len(world.history_days) == 171
    assert world.first_day == START - dt.timedelta(days=171)
    assert world.last_day == START + dt.timedelta(days=29)
    assert len(world.interactions(world.first_day)) == 850_209 - 170 * 5000

    previous_max = None
    for ds in [*world.history_days[-3:], *(START + dt.timedelta(days=k) for k in range(30))]:
        day = world.interactions(ds)
        original = world.source_events(ds)
        assert len(day) == 5000
        assert {c: str(t) for c, t in day.dtypes.items()} == INTERACTION_COLUMNS
        lo = pd.Timestamp(ds, tz="UTC")
        assert day["ts"].min() >= lo and day["ts"].max() < lo + pd.Timedelta(days=1)
        assert day["ts"].is_monotonic_increasing
        assert (day[["user_id", "item_id", "rating"]].to_numpy()
                == original[["user_id", "item_id", "rating"]].to_numpy()).all()
        assert original["ts"].is_monotonic_increasing
        if previous_max is not None:
            assert original["ts"].min() >= previous_max
        previous_max = original["ts"].max()

    with pytest.raises(DataUnavailable, match="valid dates"):
        world.interactions(START + dt.timedelta(days=30))
    with pytest.raises(DataUnavailable):
        world.interactions(world.first_day - dt.timedelta(days=1))
