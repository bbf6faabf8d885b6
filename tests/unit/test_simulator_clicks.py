"""The simulator's pure parts: click model, response checks, latency histogram, stats file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.simulator.core import (
    LatencyHistogram,
    MalformedResponse,
    Stats,
    click_probabilities,
    expected_clicks,
    parse_recommendation,
    position_bias,
    simulate_clicks,
    write_json_atomic,
)

RELEVANT = frozenset({1, 2, 3})


def test_position_bias_is_one_at_the_top_and_decreasing() -> None:
    b = position_bias(np.arange(10))
    assert b[0] == 1.0 and b[1] == pytest.approx(1 / np.log2(3))
    assert np.all(np.diff(b) < 0)


def test_click_probability_depends_on_relevance_and_position() -> None:
    p = click_probabilities([1, 9, 2, 8], RELEVANT, p_relevant=0.6, p_noise=0.01)
    np.testing.assert_allclose(p, [0.6, 0.01, 0.6 / 2.0, 0.01])
    assert click_probabilities([], RELEVANT).size == 0
    with pytest.raises(ValueError):
        click_probabilities([1], RELEVANT, p_relevant=1.5)
    with pytest.raises(ValueError):
        click_probabilities([1], RELEVANT, p_noise=-0.1)


def test_relevant_items_near_the_top_earn_more_clicks() -> None:
    top = [1, 2, 3, 10, 11, 12, 13, 14, 15, 16]
    bottom = [10, 11, 12, 13, 14, 15, 16, 1, 2, 3]
    none = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    e_top, e_bottom, e_none = (expected_clicks(x, RELEVANT) for x in (top, bottom, none))
    assert e_top > e_bottom > e_none
    # Monte Carlo with a seeded generator agrees with the expectation, and keeps the order.
    rng = np.random.default_rng(0)
    n = 20_000
    measured = {name: sum(simulate_clicks(items, RELEVANT, rng).size for _ in range(n)) / n
                for name, items in (("top", top), ("bottom", bottom), ("none", none))}
    assert measured["top"] == pytest.approx(e_top, rel=0.05)
    assert measured["bottom"] == pytest.approx(e_bottom, rel=0.05)
    assert measured["none"] == pytest.approx(e_none, abs=0.01)
    assert measured["top"] > 1.5 * measured["bottom"] > 1.5 * measured["none"]


def test_clicks_are_reproducible_from_the_seed() -> None:
    items = list(range(1, 11))
    a = simulate_clicks(items, RELEVANT, np.random.default_rng([0, 2, 7]), p_relevant=0.9)
    b = simulate_clicks(items, RELEVANT, np.random.default_rng([0, 2, 7]), p_relevant=0.9)
    assert a.tolist() == b.tolist()
    assert simulate_clicks(items, frozenset(), np.random.default_rng(1), p_noise=0.0).size == 0
    always = simulate_clicks([1, 2], RELEVANT, np.random.default_rng(1), p_relevant=1.0)
    assert always.tolist()[:1] == [0]  # the top relevant item is clicked for sure


def test_recommendation_bodies_are_checked() -> None:
    good = {"user_id": 1, "items": [5, 6], "scores": [0.9, 0.1], "version": 3,
            "impression_id": "abc", "revision": 1}
    rec = parse_recommendation(good, k=10)
    assert rec.items == [5, 6] and rec.version == 3 and rec.impression_id == "abc"
    bad = [
        [],
        {**good, "items": "5,6"},
        {**good, "items": [5, 6.5]},
        {**good, "items": [True]},
        {**good, "items": list(range(11))},
        {**good, "version": 0},
        {**good, "version": "3"},
        {**good, "impression_id": ""},
        {k: v for k, v in good.items() if k != "impression_id"},
        {**good, "scores": [0.9]},
    ]
    for body in bad:
        with pytest.raises(MalformedResponse):
            parse_recommendation(body, k=10)


def test_latency_histogram_quantiles_are_close() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    values = np.random.default_rng(0).lognormal(np.log(0.02), 0.5, 10_000)
    for v in values:
        h.record(v)
    for q in (0.5, 0.95, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.05)
    h.record(1e4)  # beyond the last bucket: clamped, not lost
    assert h.count == values.size + 1


def test_stats_snapshot_reports_ctr_per_version_and_failures() -> None:
    s = Stats()
    s.sent = 6
    s.record_ok(1, 0.010, 10, 3)
    s.record_ok(1, 0.020, 10, 1)
    s.record_ok(2, 0.030, 10, 0)
    s.record_failure("http_500")
    s.record_failure("timeout")
    s.record_overload("in_flight_cap")
    s.record_feedback(None)
    s.record_feedback("http_404")
    doc = s.snapshot(elapsed_s=2.0, rate=3.0, final=True)
    assert doc["sent"] == 6 and doc["ok"] == 3
    assert doc["failed"] == {"http_500": 1, "overload": 1, "timeout": 1}
    assert doc["overload"] == {"in_flight_cap": 1}
    assert doc["per_version"]["1"] == {"impressions": 2, "items_shown": 20, "clicks": 4, "ctr": 2.0}
    assert doc["per_version"]["2"]["ctr"] == 0.0
    assert doc["feedback_ok"] == 1 and doc["feedback_failed"] == 1
    assert doc["send_rate"] == 3.0 and doc["final"] is True
    assert doc["latency_ms"]["p50"] == pytest.approx(20.0, rel=0.05)
    json.dumps(doc)


def test_stats_file_is_replaced_whole(tmp_path) -> None:
    path = tmp_path / "stats.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
