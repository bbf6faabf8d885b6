"""read_window/scrape_health against a real Prometheus scraping two real router-metric
exporters (serving.router.metrics.RouterMetrics in the serving venv) whose counters the test
moves by known amounts at known times."""

from __future__ import annotations

import math
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest

from dayloop.rollout.prom import PrometheusUnavailable, read_window, scrape_health, window_seconds
from serving_helpers import (
    ROUTER_METRICS_EXPORTER,
    RouterPrometheus,
    Service,
    free_port,
    post_event,
    prom_value,
    serving_python,
)

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed")
SCRAPE_S = 1.0

# Before the window: version 1 has traffic on both replicas, so its series exist at the
# window's start. Version 2 (the canary) gets its first traffic inside the window.
PRE = {
    "a": [{"version": "1", "requests": 100, "impressions": 90, "clicks": 20,
           "latency": [[0.004, 100]], "score": [[0.35, 90]]}],
    "b": [{"version": "1", "requests": 50, "impressions": 45, "latency": [[0.004, 50]],
           "score": [[0.35, 45]]}],
}
# Six bursts inside the window, 3 s apart. B's version-1 clicks, all errors, the one
# non-finite and everything of version 2 are series born inside the window.
BURSTS = 6
BURST_EVERY_S = 3.0
BURST = {
    "a": [{"version": "1", "requests": 30, "impressions": 25, "clicks": 5,
           "latency": [[0.004, 27], [0.04, 3]], "score": [[0.35, 25]]},
          {"version": "2", "requests": 5, "impressions": 5, "latency": [[0.09, 5]], "score": [[0.75, 5]]}],
    "b": [{"version": "1", "requests": 20, "impressions": 15, "clicks": 3,
           "latency": [[0.004, 20]], "score": [[0.35, 15]]},
          {"version": "2", "clicks": 1}],
}
ONE_OFF = {1: ("a", {"version": "1", "errors": {"timeout": 3}}),
           2: ("b", {"version": "1", "errors": {"index": 2}}),
           4: ("a", {"version": "1", "nonfinite": 1})}


def _bucket(buckets: list[tuple[float, float]], le: float) -> float:
    return dict(buckets)[le]


def test_window_is_whole_seconds_rounded_up_and_at_least_two_scrapes():
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert window_seconds(t0, t0 + timedelta(seconds=30)) == 30
    assert window_seconds(t0, t0 + timedelta(seconds=30, microseconds=1)) == 30  # float noise
    assert window_seconds(t0, t0 + timedelta(seconds=30.5)) == 31
    assert window_seconds(t0, t0 + timedelta(seconds=0.5)) == 2
    assert window_seconds(t0, t0 + timedelta(seconds=20), scrape_interval_seconds=15) == 30
    with pytest.raises(ValueError, match="after start"):
        window_seconds(t0, t0)
    with pytest.raises(ValueError, match="timezone-aware"):
        window_seconds(t0.replace(tzinfo=None), t0 + timedelta(seconds=5))
    with pytest.raises(ValueError, match="scrape_interval_seconds"):
        window_seconds(t0, t0 + timedelta(seconds=5), scrape_interval_seconds=0)


def test_bad_arguments_are_refused_before_any_request():
    t0 = datetime.now(timezone.utc)
    for versions in ([], [0], ["1"], [True]):
        with pytest.raises(ValueError, match="version"):
            read_window("http://127.0.0.1:1", versions, t0 - timedelta(seconds=10), t0)
    with pytest.raises(ValueError, match="http"):
        read_window("127.0.0.1:9090", [1], t0 - timedelta(seconds=10), t0)


def test_unreachable_prometheus_raises_instead_of_reading_empty():
    t0 = datetime.now(timezone.utc)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusUnavailable, match="did not answer"):
        read_window(url, [1, 2], t0 - timedelta(seconds=30), t0, timeout_s=2)
    with pytest.raises(PrometheusUnavailable):
        scrape_health(url, timeout_s=2)


@needs_prometheus
def test_read_window_counts_what_happened_in_the_window(tmp_path):
    stack = RouterPrometheus(PROMETHEUS, tmp_path)
    ports, prom_port, prom_url, prom = stack.ports, stack.prom_port, stack.prom_url, stack.prom
    try:
        stack.wait_ready()
        for r, events in PRE.items():
            for event in events:
                post_event(ports[r], event)
        deadline = time.monotonic() + 20
        while prom_value(prom_port, 'sum(dayloop_router_requests_total{version="1"})') != 150:
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.2)
        # Two more scrapes, so version 1's series have samples before the window opens.
        time.sleep(2 * SCRAPE_S + 0.2)

        start = datetime.now(timezone.utc)
        t_start = time.monotonic()
        for i in range(BURSTS):
            # The first burst waits 2 s and the last leaves 3 s: each lands between two
            # in-window scrapes of the pre-existing series, so increase() misses none of it.
            time.sleep(max(0.0, t_start + 2.0 + i * BURST_EVERY_S - time.monotonic()))
            for r, events in BURST.items():
                for event in events:
                    post_event(ports[r], event)
            if i in ONE_OFF:
                r, event = ONE_OFF[i]
                post_event(ports[r], event)
        time.sleep(3 * SCRAPE_S)
        end = datetime.now(timezone.utc)

        got = read_window(prom_url, [1, 2, 3], start, end)
        # A window that closes before version 2's first request (its first burst came 2 s
        # after `start`): version 1 has series but no new traffic, version 2 none yet.
        before = read_window(prom_url, [1, 2], start - timedelta(seconds=2), start + timedelta(seconds=1))
        health = scrape_health(prom_url)
        health_window = scrape_health(prom_url, start=start, end=end)
        stack.exporters["b"].stop()
        deadline = time.monotonic() + 15
        while (after_stop := scrape_health(prom_url))["healthy"]:
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.3)
        over_stop = scrape_health(prom_url, start=start, end=datetime.now(timezone.utc))
    finally:
        stack.stop()

    w = window_seconds(start, end)
    assert got[1].window_seconds == w and 20 <= w <= 25
    # Pre-existing series go through increase(), which sees every increment (see above) and
    # extrapolates from the first/last in-window sample to the window's edges: it can only
    # read high, by at most w / (w - 2 gaps), each gap under one scrape interval (plus 0.25 s
    # of scrape jitter): under 14% for this ~21 s window. Series born inside the window are
    # counted from zero with their last value, so they are exact.
    k = w / (w - 2 * (SCRAPE_S + 0.25))

    def between(value, existing, born=0.0):
        assert value is not None
        assert existing + born - 1e-9 <= value <= existing * k + born + 1e-9, (value, existing, born, k)

    v1, v2, v3 = got[1], got[2], got[3]
    between(v1.requests, BURSTS * 50)
    between(v1.impressions, BURSTS * 40)
    between(v1.clicks, BURSTS * 5, born=BURSTS * 3)  # replica b's clicks series is born in the window
    assert v1.errors == 5.0  # born series: exact, though each error series was created by its first error
    assert v1.nonfinite == 1.0  # the single NaN is seen (increase() alone would read 0)
    les = [le for le, _ in v1.latency_buckets]
    assert les == sorted(les) and les[-1] == math.inf and 0.005 in les and 0.05 in les
    counts = [c for _, c in v1.latency_buckets]
    assert counts == sorted(counts)
    between(_bucket(v1.latency_buckets, 0.005), BURSTS * 47)
    between(_bucket(v1.latency_buckets, 0.05), BURSTS * 50)
    between(_bucket(v1.latency_buckets, math.inf), BURSTS * 50)
    assert _bucket(v1.latency_buckets, 0.001) == 0.0
    between(_bucket(v1.score_buckets, 0.4), BURSTS * 40)
    assert _bucket(v1.score_buckets, 0.3) == 0.0

    # The canary's every series is born in the window: exact.
    assert (v2.requests, v2.impressions, v2.clicks) == (BURSTS * 5, BURSTS * 5, BURSTS * 1)
    assert (v2.errors, v2.nonfinite) == (0.0, 0.0)  # requests exist, nothing failed
    assert _bucket(v2.latency_buckets, 0.075) == 0.0
    assert _bucket(v2.latency_buckets, 0.1) == _bucket(v2.latency_buckets, math.inf) == BURSTS * 5
    assert _bucket(v2.score_buckets, 0.7) == 0.0
    assert _bucket(v2.score_buckets, 0.8) == BURSTS * 5

    # No traffic ever: every field missing, errors included (nothing proves the router saw it).
    assert (v3.requests, v3.errors, v3.nonfinite, v3.impressions, v3.clicks,
            v3.latency_buckets, v3.score_buckets) == (None,) * 7

    assert before[1].requests == 0.0 and before[1].errors == 0.0
    assert before[2].requests is None and before[2].errors is None and before[2].latency_buckets is None

    assert health == {"targets": {f"127.0.0.1:{ports['a']}": True, f"127.0.0.1:{ports['b']}": True},
                      "up": 2, "total": 2, "healthy": True}
    assert health_window["healthy"]
    assert after_stop["targets"][f"127.0.0.1:{ports['b']}"] is False and after_stop["up"] == 1
    assert not over_stop["healthy"] and over_stop["targets"][f"127.0.0.1:{ports['a']}"]

    # Prometheus is gone now: an error, not empty (healthy-looking) answers.
    with pytest.raises(PrometheusUnavailable):
        read_window(prom_url, [1, 2], start, end, timeout_s=2)


@needs_prometheus
def test_a_server_that_is_not_prometheus_is_unavailable(tmp_path):
    port = free_port()
    exporter = Service("exporter", [str(serving_python()), "-c", ROUTER_METRICS_EXPORTER, str(port)], tmp_path)
    try:
        exporter.wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        t0 = datetime.now(timezone.utc)
        with pytest.raises(PrometheusUnavailable, match="404"):
            read_window(f"http://127.0.0.1:{port}", [1], t0 - timedelta(seconds=30), t0, timeout_s=2)
        with pytest.raises(PrometheusUnavailable):
            scrape_health(f"http://127.0.0.1:{port}", timeout_s=2)
    finally:
        exporter.stop()
