"""The revisioned route store: compare-and-swap, append-only history (SQLite)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from serving.route_store import RouteStore, StaleRevision
from serving.routing import canary_table, single_version_table


@pytest.fixture
def store(tmp_path):
    return RouteStore(f"sqlite:///{tmp_path / 'routes.sqlite'}")


def test_empty_store(store):
    assert store.latest_revision() == 0
    assert store.current() is None
    assert store.history() == []


def test_writes_are_revisions_with_actor_and_reason(store):
    r1 = store.write(single_version_table(1), 0, "alice", "bootstrap")
    r2 = store.write(canary_table(1, 2, 5, "s"), 1, "daily_refresh", "canary 5%")
    assert (r1.revision, r2.revision) == (1, 2)
    cur = store.current()
    assert cur.revision == 2 and cur.table == canary_table(1, 2, 5, "s")
    hist = store.history()
    assert [h.revision for h in hist] == [2, 1]
    assert hist[1].actor == "alice" and hist[1].reason == "bootstrap" and hist[1].created_at
    assert store.get(1).table == single_version_table(1)


def test_stale_revision_is_refused_and_changes_nothing(store):
    store.write(single_version_table(1), 0, "a", "boot")
    with pytest.raises(StaleRevision) as err:
        store.write(single_version_table(2), 0, "b", "late")
    assert err.value.current == 1
    assert store.latest_revision() == 1 and store.current().table == single_version_table(1)


@pytest.mark.parametrize("actor, reason", [("", "x"), ("a", ""), ("a", " "), (None, "x"), ("a" * 201, "x")])
def test_actor_and_reason_are_required(store, actor, reason):
    with pytest.raises(ValueError):
        store.write(single_version_table(1), 0, actor, reason)
    assert store.latest_revision() == 0


def test_history_is_append_only(store, tmp_path):
    store.write(single_version_table(1), 0, "a", "boot")
    conn = sqlite3.connect(tmp_path / "routes.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE route_revisions SET actor = 'mallory'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM route_revisions")


def test_concurrent_writers_exactly_one_wins_per_revision(tmp_path):
    url = f"sqlite:///{tmp_path / 'routes.sqlite'}"
    RouteStore(url).write(single_version_table(1), 0, "a", "boot")
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        s = RouteStore(url)
        barrier.wait()
        try:
            s.write(canary_table(1, 2, 5 + i, "s"), 1, f"w{i}", "race")
            outcomes.append("won")
        except StaleRevision:
            outcomes.append("stale")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1 and outcomes.count("stale") == 7
    assert RouteStore(url).latest_revision() == 2


def test_bad_urls_are_refused(tmp_path):
    with pytest.raises(ValueError):
        RouteStore("mysql://x")
    with pytest.raises(ValueError):
        RouteStore("sqlite:///relative.db")


def test_many_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    """Two router replicas start together on a new SQLite file (the WAL switch races)."""
    import subprocess
    import sys

    for trial in range(5):
        url = f"sqlite:///{tmp_path / f'routes{trial}.sqlite'}"
        code = f"from serving.route_store import RouteStore; RouteStore({url!r}).latest_revision()"
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(6)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
