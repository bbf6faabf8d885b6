"""The simulator panel: file format round trip, bad input, replay and synthetic sources."""

from __future__ import annotations

import datetime as dt
import json
import zipfile

import numpy as np
import pytest

from dayloop.config import Settings, SyntheticSettings
from dayloop.data.synthetic import SyntheticWorld
from dayloop.errors import DataUnavailable
from dayloop.simulation.panel import (
    main,
    panel_from_replay,
    panel_from_synthetic,
    read_panel,
    write_panel,
)

START = dt.date(2026, 3, 1)
SMALL = SyntheticSettings(n_users=120, n_items=90, dim=8, events_per_day=400,
                          history_days=3, replay_days=6, drift=0.0, seed=5)


def synthetic_settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", data_cache=tmp_path / "cache", source="synthetic",
                    replay_start_override=START, synthetic=SMALL)


def test_round_trip_keeps_users_items_and_meta(tmp_path) -> None:
    path = write_panel(tmp_path / "p.npz", np.array([30, 10, 20]),
                       [[5, 3, 5], np.array([7], dtype=np.int32), []], {"kind": "test", "n": 3})
    panel = read_panel(path)
    # sorted by user, items sorted and de-duplicated, the empty set kept
    assert panel.user_ids.tolist() == [10, 20, 30]
    assert [r.tolist() for r in panel.relevant] == [[7], [], [3, 5]]
    assert panel.meta["kind"] == "test" and panel.meta["n"] == 3
    assert panel.relevant_for(30).tolist() == [3, 5]
    with pytest.raises(KeyError):
        panel.relevant_for(11)


def test_file_is_plain_arrays_readable_without_pickle(tmp_path) -> None:
    path = write_panel(tmp_path / "panel", [1, 2], [[4, 5], [6]], {"a": 1})
    assert path == tmp_path / "panel"  # no ".npz" appended behind the caller's back
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["meta_json", "rel_indptr", "rel_items", "user_ids"]
        assert data["user_ids"].dtype == np.int64 and data["rel_items"].dtype == np.int64
        assert data["rel_indptr"].tolist() == [0, 2, 3]
        assert data["rel_items"].tolist() == [4, 5, 6]
        assert data["meta_json"].shape == () and data["meta_json"].dtype.kind == "U"
        assert json.loads(str(data["meta_json"][()]))["a"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["panel"]  # no temp file left behind


def test_rewrite_replaces_the_file_whole(tmp_path) -> None:
    path = tmp_path / "p.npz"
    write_panel(path, [1], [[1]], {})
    write_panel(path, [2, 3], [[2], [3]], {"v": 2})
    panel = read_panel(path)
    assert panel.user_ids.tolist() == [2, 3] and panel.meta["v"] == 2


@pytest.mark.parametrize(
    ("users", "relevant", "meta", "match"),
    [
        ([], [], {}, "at least one user"),
        ([1, 2], [[1]], {}, "same length"),
        ([1], [[1], [2]], {}, "same length"),
        ([1, 1], [[1], [2]], {}, "unique"),
        ([[1, 2]], [[1]], {}, "one-dimensional"),
        ([1.5], [[1]], {}, "integer"),
        ([1], [[0.5]], {}, "integer"),
        ([1], [[-3]], {}, "non-negative"),
        ([1], [[1]], {"bad": object()}, "JSON"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(tmp_path, users, relevant, meta, match) -> None:
    path = tmp_path / "p.npz"
    with pytest.raises(ValueError, match=match):
        write_panel(path, users, relevant, meta)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_panel_is_refused(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, user_ids=np.arange(3))
    with pytest.raises(ValueError, match="missing"):
        read_panel(path)
    np.savez(path, user_ids=np.arange(3), rel_indptr=np.array([0, 1, 5, 2]),
             rel_items=np.arange(2), meta_json=np.array("{}"))
    with pytest.raises(ValueError, match="rel_indptr"):
        read_panel(path)


def test_synthetic_panel_holds_each_users_true_top_items() -> None:
    world = SyntheticWorld(SMALL, START)
    ds = START + dt.timedelta(days=2)
    panel = panel_from_synthetic(world, ds, top_n=7)
    assert panel.user_ids.tolist() == list(range(1, SMALL.n_users + 1))
    assert all(r.size == 7 for r in panel.relevant)
    logits = world.relevance(panel.user_ids, ds)
    for row, rel in enumerate(panel.relevant):
        chosen = logits[row, rel - 1]
        others = np.delete(logits[row], rel - 1)
        assert chosen.min() >= others.max()
    assert panel.meta["kind"] == "synthetic" and panel.meta["ds"] == ds.isoformat()
    assert panel.meta["synthetic"] == SMALL.model_dump()


def test_synthetic_panel_checks_its_arguments() -> None:
    world = SyntheticWorld(SMALL, START)
    assert all(r.size == SMALL.n_items for r in panel_from_synthetic(world, START, top_n=500).relevant)
    with pytest.raises(ValueError):
        panel_from_synthetic(world, START, top_n=0)
    with pytest.raises(DataUnavailable):
        panel_from_synthetic(world, world.last_day + dt.timedelta(days=1))


def test_replay_panel_is_the_held_out_interactions(tmp_path) -> None:
    settings = synthetic_settings(tmp_path)
    world = SyntheticWorld(SMALL, START)
    after = START + dt.timedelta(days=1)
    panel = panel_from_replay(settings, after, days=2)
    days = [after + dt.timedelta(days=1), after + dt.timedelta(days=2)]
    events = [world.interactions(d) for d in days]
    expected: dict[int, set[int]] = {}
    for df in events:
        for u, i in zip(df["user_id"], df["item_id"]):
            expected.setdefault(int(u), set()).add(int(i))
    assert panel.user_ids.tolist() == sorted(expected)
    assert {int(u): set(r.tolist()) for u, r in zip(panel.user_ids, panel.relevant)} == expected
    # the day of `after` itself is not in the window
    assert panel.meta["days"] == [d.isoformat() for d in days] and not panel.meta["clipped"]


def test_replay_panel_clips_to_the_data_and_samples_users(tmp_path) -> None:
    settings = synthetic_settings(tmp_path)
    last = START + dt.timedelta(days=SMALL.replay_days - 1)
    clipped = panel_from_replay(settings, last - dt.timedelta(days=1), days=7)
    assert clipped.meta["days"] == [last.isoformat()] and clipped.meta["clipped"]
    with pytest.raises(DataUnavailable, match="pick --after"):
        panel_from_replay(settings, last, days=7)
    full = panel_from_replay(settings, START, days=3)
    sample = panel_from_replay(settings, START, days=3, max_users=10, seed=1)
    assert sample.n_users == 10 and set(sample.user_ids) <= set(full.user_ids)
    for u, rel in zip(sample.user_ids, sample.relevant):
        assert np.array_equal(rel, full.relevant_for(int(u)))
    again = panel_from_replay(settings, START, days=3, max_users=10, seed=1)
    assert np.array_equal(again.user_ids, sample.user_ids)
    with pytest.raises(ValueError):
        panel_from_replay(settings, START, days=0)


def test_cli_writes_a_panel(tmp_path, monkeypatch, capsys) -> None:
    for name, value in {"DAYLOOP_SOURCE": "synthetic", "DAYLOOP_REPLAY_START": START.isoformat(),
                        "DAYLOOP_SYNTH_USERS": "50", "DAYLOOP_SYNTH_ITEMS": "40",
                        "DAYLOOP_SYNTH_EVENTS_PER_DAY": "200", "DAYLOOP_SYNTH_HISTORY_DAYS": "2",
                        "DAYLOOP_SYNTH_REPLAY_DAYS": "4"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "synthetic.npz"
    assert main(["--out", str(out), "--synthetic", "--top-n", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["n_users"] == 50
    assert read_panel(out).meta["top_n"] == 5
    out2 = tmp_path / "replay.npz"
    assert main(["--out", str(out2), "--after", START.isoformat(), "--days", "2"]) == 0
    assert read_panel(out2).meta["days"] == ["2026-03-02", "2026-03-03"]
    assert main(["--out", str(out2), "--after", "2030-01-01"]) == 1
    assert "no data" in capsys.readouterr().err
