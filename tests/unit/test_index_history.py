"""The history an index is built with (include/dayloop/index/history.py), on a small landing
zone and feature set written here: the window, the day ds and every landed day before the
window are in it; later days, nulls and negative ids are not."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

from dayloop.config import Settings
from dayloop.data.landing import write_partition
from dayloop.index.history import collect_seen
from serving.index_service.seen import encode_seen, parse_seen

DS = dt.date(2026, 3, 10)


def _day(ds: dt.date, pairs: list[tuple[int | None, int | None]]) -> pd.DataFrame:
    ts = pd.Timestamp(ds.isoformat(), tz="UTC")
    return pd.DataFrame({
        "user_id": pd.array([u for u, _ in pairs], dtype="Int64"),
        "item_id": pd.array([i for _, i in pairs], dtype="Int64"),
        "rating": pd.array([4] * len(pairs), dtype="int64"),
        "ts": [ts] * len(pairs),
    })


def _features(path: Path, ds: dt.date, train: list[tuple[int, int]], targets: dict[int, list[int]]) -> Path:
    path.mkdir(parents=True)
    pd.DataFrame({"user_id": [u for u, _ in train], "item_id": [i for _, i in train],
                  "ts": [pd.Timestamp(ds.isoformat(), tz="UTC")] * len(train),
                  "hist": [[] for _ in train]}).to_parquet(path / "train.parquet")
    pd.DataFrame({"user_id": list(targets), "hist": [[] for _ in targets], "seen": [[] for _ in targets],
                  "targets": list(targets.values())}).to_parquet(path / "eval.parquet")
    (path / "meta.json").write_text(json.dumps({"ds": ds.isoformat()}))
    return path


def test_history_is_the_window_the_day_and_every_landed_day_before(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "home")
    write_partition(_day(DS - dt.timedelta(days=100), [(1, 50), (2, 51)]), DS - dt.timedelta(days=100), s)
    write_partition(_day(DS - dt.timedelta(days=1), [(1, 60), (None, 61), (3, None), (-4, 62)]),
                    DS - dt.timedelta(days=1), s)
    write_partition(_day(DS, [(2, 70)]), DS, s)
    write_partition(_day(DS + dt.timedelta(days=1), [(1, 99)]), DS + dt.timedelta(days=1), s)  # the future
    feats = _features(tmp_path / "features", DS, train=[(1, 60), (1, 61), (5, 80)], targets={2: [70, 71], 6: [90]})

    h = collect_seen(s, DS, feats)
    assert h.last_day == DS.isoformat() and h.landed_days == 3
    assert h.first_day == (DS - dt.timedelta(days=100)).isoformat()
    seen = parse_seen(encode_seen(h.user_ids, h.offsets, h.items, h.last_day))
    assert seen.items_for(1).tolist() == [50, 60, 61]  # landed before the window + the window; not 99
    assert seen.items_for(2).tolist() == [51, 70, 71]  # eval targets on ds count too
    assert seen.items_for(5).tolist() == [80] and seen.items_for(6).tolist() == [90]
    assert seen.items_for(3).size == 0 and seen.items_for(4).size == 0  # null item, negative user dropped
    meta = h.meta("ab" * 32)
    assert meta["last_day"] == DS.isoformat() and meta["n_pairs"] == 8 and meta["file"] == "seen_items.npz"


def test_a_feature_set_of_another_day_is_refused(tmp_path: Path) -> None:
    s = Settings(home=tmp_path / "home")
    feats = _features(tmp_path / "features", DS - dt.timedelta(days=1), train=[(1, 2)], targets={1: [3]})
    with pytest.raises(ValueError, match="is for 2026-03-09, not 2026-03-10"):
        collect_seen(s, DS, feats)
