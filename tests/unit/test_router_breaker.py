"""The router's circuit breaker and fallback lists: pure logic on a fake clock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.index_service.seen import SeenItems, csr_from_pairs
from serving.router.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerConfig
from serving.router.fallback import PopularityList, StaticList, StaticListError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _breaker(**kw):
    clock = Clock()
    return Breaker(BreakerConfig(**kw), clock=clock, wall=clock), clock


def test_opens_on_the_nth_fault_inside_the_window_and_not_before():
    br, clock = _breaker(failures=3, window_s=10.0, cooldown_s=30.0)
    assert not br.failure("nonfinite")
    clock.t += 1
    assert br.success() is False  # a success does not reset the window
    assert not br.failure("timeout")
    assert br.state == CLOSED and br.allow()
    clock.t += 1
    assert br.failure("nonfinite")
    assert br.state == OPEN and br.trips == 1
    assert br.last_trip["faults"] == {"nonfinite": 2, "timeout": 1}
    assert not br.allow()


def test_faults_older_than_the_window_are_forgotten():
    br, clock = _breaker(failures=3, window_s=10.0)
    br.failure("model_error")
    br.failure("model_error")
    clock.t += 10.5
    assert not br.failure("model_error")
    assert br.state == CLOSED


def test_half_open_lets_one_probe_through_and_its_answer_decides():
    br, clock = _breaker(failures=1, cooldown_s=30.0)
    assert br.failure("index_error") and br.state == OPEN
    clock.t += 29.9
    assert not br.allow()
    clock.t += 0.2
    assert br.allow() and br.state == HALF_OPEN
    assert not br.allow(), "one probe at a time"
    assert br.failure("index_error") and br.state == OPEN and br.trips == 2
    assert "half-open probe failed" in br.last_trip["why"]
    clock.t += 30.1
    assert br.allow()
    assert br.success() and br.state == CLOSED and br.allow()


def test_an_abandoned_probe_frees_the_slot():
    br, clock = _breaker(failures=1, cooldown_s=1.0)
    br.failure("timeout")
    clock.t += 2
    assert br.allow() and not br.allow()
    br.probe_abandoned()
    assert br.allow()


@pytest.mark.parametrize("kw", [{"failures": 0}, {"window_s": 0}, {"cooldown_s": -1}])
def test_bad_configuration_is_refused(kw):
    with pytest.raises(ValueError):
        BreakerConfig(**kw)


def _seen(pairs):
    users, items = zip(*pairs, strict=True)
    u, o, i = csr_from_pairs(np.array(users), np.array(items))
    return SeenItems(u, o, i, "2026-01-02")


def test_popularity_ranks_by_users_and_leaves_out_what_the_user_saw():
    seen = _seen([(1, 10), (2, 10), (3, 10), (1, 20), (2, 20), (3, 30), (4, 40), (4, 10)])
    pop = PopularityList.build(7, seen, "ab" * 32)
    assert pop.order.tolist() == [10, 20, 30, 40]
    assert pop.answer(1, 2) == ([30, 40], [0.25, 0.25])
    assert pop.answer(99, 3)[0] == [10, 20, 30]  # a user without history gets the head
    assert pop.answer(4, 10)[0] == [20, 30]       # fewer than k left: no repeats, no seen items


def test_an_empty_seen_table_builds_no_popularity_list():
    empty = SeenItems(np.array([], dtype=np.int64), np.array([0], dtype=np.int64),
                      np.array([], dtype=np.int64), "2026-01-02")
    with pytest.raises(ValueError, match="empty"):
        PopularityList.build(1, empty, "00" * 32)


def test_static_list_reads_the_shipped_file_and_refuses_bad_ones(tmp_path):
    from serving.launch import PlaneConfig

    shipped = StaticList.from_file(PlaneConfig(home=tmp_path, python=tmp_path).static_items)
    assert len(shipped.items) >= 100 and len(set(shipped.items)) == len(shipped.items)
    ids, scores = shipped.answer(10)
    assert ids == list(shipped.items[:10]) and scores == [0.0] * 10
    for bad in ([], [1, 1], [1, -2], [True], {"items": "x"}, "nope"):
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(bad))
        with pytest.raises(StaticListError):
            StaticList.from_file(f)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(StaticListError, match="not JSON"):
        StaticList.from_file(tmp_path / "junk.json")
    with pytest.raises(StaticListError, match="cannot read"):
        StaticList.from_file(tmp_path / "missing.json")
