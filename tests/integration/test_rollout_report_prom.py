"""fetch_series against a real Prometheus scraping two real router-metric exporters
(serving.router.metrics.RouterMetrics in the serving venv) moved at known rates, then the
report rendered from what came back."""

from __future__ import annotations

import shutil
import statistics
import time
from datetime import datetime, timedelta, timezone

import pytest

from dayloop.rollout.plan import PROFILES
from dayloop.rollout.report import fetch_series, render_report
from serving_helpers import RouterPrometheus, post_event, prom_value

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(not PROMETHEUS, reason="prometheus not installed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONTROL, CANARY, IDLE = 1, 2, 3
SECONDS = 15
# What each of the two replicas gets every second: control clean, canary failing a quarter
# of its attempts, slower, clicked a little more. Per second across both replicas: control
# 20 requests, 4 clicks / 20 impressions; canary 8 requests, 2 errors, 2 clicks / 8 impressions.
EVERY_SECOND = [
    {"version": str(CONTROL), "requests": 10, "impressions": 10, "clicks": 2, "latency": [[0.004, 10]]},
    {"version": str(CANARY), "requests": 4, "errors": {"timeout": 1}, "impressions": 4, "clicks": 1,
     "latency": [[0.09, 4]]},
]
RATE = {CONTROL: 20.0, CANARY: 8.0}
CTR = {CONTROL: 0.2, CANARY: 0.25}
SHARE = {CONTROL: 0.8, CANARY: 0.2}


def _settled(points, since: float, until: float) -> list[float]:
    """Values whose whole rate window lies inside the traffic."""
    return [v for t, v in points if since <= t <= until]


@needs_prometheus
def test_fetch_series_reads_what_the_routers_did_and_the_report_plots_it(tmp_path):
    stack = RouterPrometheus(PROMETHEUS, tmp_path)
    ports, prom_port, prom_url, prom = stack.ports, stack.prom_port, stack.prom_url, stack.prom
    try:
        stack.wait_ready()
        for port in ports.values():
            for v, share in SHARE.items():
                post_event(port, {"version": str(v), "share": share})
        # Prometheus picks its targets up a few seconds after it is ready: wait until both
        # replicas are scraped, or the first seconds of traffic would predate every sample.
        deadline = time.monotonic() + 20
        while prom_value(prom_port, "count(dayloop_router_route_share)") != 2 * len(SHARE):
            assert time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.2)

        start = datetime.now(timezone.utc)
        t0 = time.monotonic()
        for i in range(SECONDS):
            time.sleep(max(0.0, t0 + i - time.monotonic()))
            for port in ports.values():
                for event in EVERY_SECOND:
                    post_event(port, event)
            if i == 5:
                # One NaN: it creates the canary's series at 1, which plain rate() never sees.
                post_event(ports["a"], {"version": str(CANARY), "nonfinite": 1})
        traffic_end = datetime.now(timezone.utc)
        time.sleep(3.0)  # the last bursts scraped
        end = datetime.now(timezone.utc)
        series = fetch_series(prom_url, [CONTROL, CANARY, IDLE], start - timedelta(seconds=5), end, step_s=1.0)
    finally:
        stack.stop()

    assert set(series) == {"request_rate", "error_ratio", "p99_latency_s", "nonfinite_rate", "ctr",
                           "route_share"}
    for key, per_version in series.items():
        assert IDLE not in per_version, key  # no traffic, no series: no entry
    # The rate window is max(4 x 1 s, 10 s): 10 s; from then on it lies inside the traffic.
    since, until = start.timestamp() + 11.0, traffic_end.timestamp()
    assert until - since >= 2.0
    for v in (CONTROL, CANARY):
        rates = _settled(series["request_rate"][v], since, until)
        assert rates, series["request_rate"][v]
        # A 10 s window holds 10 or 11 of the once-a-second bursts, and increase() extrapolates
        # to the window's edges: each point within 20%, the middle one within 10%.
        assert all(r == pytest.approx(RATE[v], rel=0.2) for r in rates), rates
        assert statistics.median(rates) == pytest.approx(RATE[v], rel=0.1), rates
        ctr = _settled(series["ctr"][v], since, until)
        assert statistics.median(ctr) == pytest.approx(CTR[v], abs=0.04), ctr
        shares = [s for _, s in series["route_share"][v]]
        assert shares and all(s == pytest.approx(SHARE[v]) for s in shares), shares  # averaged, not summed
    # The clean version has no errors series at all; it still reads 0, never missing.
    control_errors = [r for _, r in series["error_ratio"][CONTROL]]
    assert control_errors and all(r == 0.0 for r in control_errors)
    canary_errors = _settled(series["error_ratio"][CANARY], since, until)
    assert canary_errors and all(r > 0 for r in canary_errors)
    assert statistics.median(canary_errors) == pytest.approx(0.25, abs=0.05)
    # Latency buckets: control's 4 ms lands in (3 ms, 5 ms], canary's 90 ms in (75 ms, 100 ms].
    control_p99 = _settled(series["p99_latency_s"][CONTROL], since, until)
    canary_p99 = _settled(series["p99_latency_s"][CANARY], since, until)
    assert control_p99 and all(0.003 < p <= 0.005 for p in control_p99), control_p99
    assert canary_p99 and all(0.075 < p <= 0.1 for p in canary_p99), canary_p99
    assert max(v for _, v in series["nonfinite_rate"][CANARY]) > 0
    assert all(v == 0.0 for _, v in series["nonfinite_rate"][CONTROL])

    steps = [{"index": 0, "percent": 20.0, "started_at": start.isoformat(),
              "ended_at": traffic_end.isoformat(), "decision": "fail", "looks": [], "analysis": None}]
    rollout = {"version": CANARY, "champion": CONTROL, "salt": "v2-test", "plan": PROFILES["demo"].to_dict(),
               "outcome": "rolled_back", "reason": "error ratio"}
    html_path = render_report(tmp_path / "report", rollout, steps, series)
    text = html_path.read_text()
    assert "Rollout of v2 vs champion v1: ROLLED_BACK" in text and "data:image/png;base64," in text
    assert (tmp_path / "report" / "rollout_metrics.png").read_bytes().startswith(PNG_MAGIC)
