"""Prometheus config and recording rules: promtool accepts them, and a real Prometheus
scraping a real exporter computes the per-version figures the exporter was built to show."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from serving.prometheus.render import config_text, render_config
from serving_helpers import ROOT, Service, free_port, serving_python

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                      reason="prometheus/promtool not installed")

# Counters grow linearly in time at these per-second rates, all read at one instant per
# scrape, so every ratio of two rates is exact whatever the scrape timing.
# version -> requests/s, errors/s by reason, nonfinite/s, fallbacks/s, impressions/s, clicks/s
RATES = {
    "1": {"requests": 50.0, "errors": {"timeout": 1.0, "index": 1.5}, "nonfinite": None,
          "fallbacks": None, "impressions": 40.0, "clicks": 12.0},
    "2": {"requests": 20.0, "errors": {"timeout": 5.0}, "nonfinite": 2.0,
          "fallbacks": 4.0, "impressions": 15.0, "clicks": 1.5},
}
# Latency histogram: per-second observations falling in each (lower, upper] bucket.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY = {"1": {0.01: 45.0, 0.05: 5.0}, "2": {0.25: 20.0}}

EXPORTER = r'''
import json, sys, time
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, HistogramMetricFamily

port, rates, buckets, latency = int(sys.argv[1]), *map(json.loads, sys.argv[2:5])
buckets = [float(b) for b in buckets]
T0 = time.time() - 1.0  # start with non-zero counters


class Router:
    def collect(self):
        t = time.time() - T0
        fam = {n: CounterMetricFamily(f"dayloop_router_{n}_total", n, labels=lab)
               for n, lab in (("requests", ["version"]), ("errors", ["version", "reason"]),
                              ("nonfinite", ["version"]), ("fallbacks", ["version"]),
                              ("impressions", ["version"]), ("clicks", ["version"]))}
        hist = HistogramMetricFamily("dayloop_router_request_seconds", "latency", labels=["version"])
        for v, r in rates.items():
            for name in ("requests", "nonfinite", "fallbacks", "impressions", "clicks"):
                if r[name] is not None:  # None: the series never appears (no such event yet)
                    fam[name].add_metric([v], r[name] * t)
            for reason, per_s in r["errors"].items():
                fam["errors"].add_metric([v, reason], per_s * t)
            per_bucket = {float(k): n for k, n in latency[v].items()}
            cum, rows, total = 0.0, [], 0.0
            for b in buckets:
                cum += per_bucket.get(b, 0.0) * t
                rows.append((repr(b), cum))
            rows.append(("+Inf", cum))
            hist.add_metric([v], rows, sum_value=sum(b * n * t for b, n in per_bucket.items()))
        yield from fam.values()
        yield hist


REGISTRY.register(Router())
start_http_server(port, addr="127.0.0.1")
while True:
    time.sleep(3600)
'''


def test_render_refuses_bad_targets_and_intervals(tmp_path):
    with pytest.raises(ValueError, match="host:port"):
        config_text(["localhost"])
    with pytest.raises(ValueError, match="host:port"):
        config_text("127.0.0.1:0")
    with pytest.raises(ValueError, match="host:port"):
        config_text(["a:1\n  - job_name: evil"])
    with pytest.raises(ValueError, match="router"):
        render_config(tmp_path, [])
    with pytest.raises(ValueError, match="interval"):
        render_config(tmp_path, ["127.0.0.1:1"], scrape_interval="1 second")
    with pytest.raises(ValueError, match="interval"):
        config_text(["127.0.0.1:1"], triton="x:1", scrape_interval="0s")
    assert not list(tmp_path.iterdir())


@needs_prometheus
def test_promtool_accepts_the_rendered_config_and_rules(tmp_path):
    config = render_config(tmp_path, ["127.0.0.1:8000", "router-2:8000"], "127.0.0.1:9000",
                           ["[::1]:8002"], scrape_interval="15s")
    assert (tmp_path / "rules.yml").read_text() == (ROOT / "serving/prometheus/rules.yml").read_text()
    text = config.read_text()
    assert "scrape_interval: 15s" in text and "evaluation_interval: 15s" in text
    assert '["127.0.0.1:8000", "router-2:8000"]' in text
    out = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rule files found" in out.stdout + out.stderr
    out = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Without index or Triton targets the jobs stay, scraping nothing; still valid.
    bare = render_config(tmp_path / "bare", "127.0.0.1:8000")
    out = subprocess.run([PROMTOOL, "check", "config", str(bare)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _values(prom, query: str) -> dict[str, float]:
    return {r["metric"].get("version", ""): float(r["value"][1]) for r in prom.custom_query(query)}


@needs_prometheus
def test_recording_rules_compute_per_version_figures(tmp_path):
    from prometheus_api_client import PrometheusConnect

    exporter_port, prom_port = free_port(), free_port()
    exporter = Service("exporter", [str(serving_python()), "-c", EXPORTER, str(exporter_port),
                                    json.dumps(RATES), json.dumps(BUCKETS),
                                    json.dumps({v: {str(b): n for b, n in d.items()}
                                                for v, d in LATENCY.items()})], tmp_path)
    config = render_config(tmp_path / "conf", [f"127.0.0.1:{exporter_port}"], scrape_interval="1s")
    prom = Service("prometheus", [PROMETHEUS, f"--config.file={config}",
                                  f"--web.listen-address=127.0.0.1:{prom_port}",
                                  f"--storage.tsdb.path={tmp_path / 'tsdb'}"], tmp_path)
    try:
        exporter.wait_http(f"http://127.0.0.1:{exporter_port}/metrics", timeout=30)
        prom.wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=30)
        client = PrometheusConnect(url=f"http://127.0.0.1:{prom_port}", disable_ssl=True)
        rules = ("dayloop:router_requests:rate30s", "dayloop:router_error_ratio:30s",
                 "dayloop:router_nonfinite_ratio:30s", "dayloop:router_fallback_ratio:30s",
                 "dayloop:router_latency_seconds:p99_30s", "dayloop:router_latency_seconds:p50_30s",
                 "dayloop:router_ctr:5m", "dayloop:router_ctr:30s")
        deadline = time.monotonic() + 30
        got: dict[str, dict[str, float]] = {}
        while time.monotonic() < deadline:
            got = {r: _values(client, r) for r in rules}
            if all(set(v) == {"1", "2"} for v in got.values()):
                break
            assert prom.alive() and exporter.alive(), prom.log_tail() + exporter.log_tail()
            time.sleep(0.5)
        assert all(set(v) == {"1", "2"} for v in got.values()), (got, prom.log_tail())
    finally:
        prom.stop()
        exporter.stop()

    # Until 30 s of samples exist, rate() extrapolates only a little past the first sample,
    # so the absolute rate reads low; both versions share scrape times, so their ratio is exact.
    req = got["dayloop:router_requests:rate30s"]
    assert req["1"] / req["2"] == pytest.approx(RATES["1"]["requests"] / RATES["2"]["requests"], rel=1e-3)
    for v, r in RATES.items():
        assert 0 < req[v] <= r["requests"] * 1.05
        assert got["dayloop:router_error_ratio:30s"][v] == pytest.approx(
            sum(r["errors"].values()) / r["requests"], rel=1e-3)
        assert got["dayloop:router_nonfinite_ratio:30s"][v] == pytest.approx(
            (r["nonfinite"] or 0.0) / r["requests"], rel=1e-3, abs=1e-9)
        assert got["dayloop:router_fallback_ratio:30s"][v] == pytest.approx(
            (r["fallbacks"] or 0.0) / r["requests"], rel=1e-3, abs=1e-9)
        for window in ("5m", "30s"):
            assert got[f"dayloop:router_ctr:{window}"][v] == pytest.approx(
                r["clicks"] / r["impressions"], rel=1e-3)
    # 45 of 50 requests/s at <= 10 ms and 5 in (25 ms, 50 ms]: p50 in the first, p99 in the second.
    assert 0.005 < got["dayloop:router_latency_seconds:p50_30s"]["1"] <= 0.01
    assert 0.025 < got["dayloop:router_latency_seconds:p99_30s"]["1"] <= 0.05
    assert 0.1 < got["dayloop:router_latency_seconds:p50_30s"]["2"] <= 0.25
    assert 0.1 < got["dayloop:router_latency_seconds:p99_30s"]["2"] <= 0.25
