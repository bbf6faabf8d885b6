"""The production health monitor, for real: the rendered alerting rules pass promtool; on a
live plane (Triton, index service, two routers, the simulator), Prometheus fires them for a
planted fault of the stable version and Alertmanager delivers them to a webhook (the one the
rollout alerts use) and to the data plane's alert log; a canary's fault pages nobody."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from dayloop.simulation.panel import write_panel
from serving.client import DataPlaneClient
from serving.launch import DataPlane, PlaneConfig, webhook_from_env
from serving.prometheus.render import alertmanager_text, render_config
from serving.routing import canary_table, single_version_table
from serving_helpers import free_port, make_bundle, make_index, serving_python, top_items

pytestmark = pytest.mark.integration

USERS = (np.arange(1, 201) * 7).astype(np.int64)


class Sink:
    """A webhook that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, status: str = "firing") -> list[dict]:
        return [a for n in self.received for a in n.get("alerts", []) if a.get("status") == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_promtool_accepts_the_alerting_rules_and_the_rendered_alertmanager_config(tmp_path):
    config = render_config(tmp_path, ["127.0.0.1:8100"], "127.0.0.1:8200", "127.0.0.1:8002",
                           alertmanager="127.0.0.1:9093")
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alerts.yml" in out.stdout and "SUCCESS" in out.stdout
    rules = subprocess.run(["promtool", "check", "rules", str(tmp_path / "alerts.yml")], capture_output=True,
                           text=True)
    assert rules.returncode == 0 and "8 rules found" in rules.stdout, rules.stdout + rules.stderr
    am = tmp_path / "alertmanager.yml"
    am.write_text(alertmanager_text(["http://127.0.0.1:9097/", "https://hooks.example/x"]))
    check = subprocess.run(["amtool", "check-config", str(am)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    for bad in ([], ["ftp://x"], ['http://x/"y']):
        with pytest.raises(ValueError):
            alertmanager_text(bad)


def test_the_alert_webhook_is_the_rollout_alerts_connection():
    assert webhook_from_env({"DAYLOOP_ALERT_WEBHOOK": "http://a/b"}) == "http://a/b"
    conn = json.dumps({"conn_type": "http", "host": "https://hooks.example/x"})
    assert webhook_from_env({"AIRFLOW_CONN_DAYLOOP_ALERT_WEBHOOK": conn}) == "https://hooks.example/x"
    assert webhook_from_env({"AIRFLOW_CONN_DAYLOOP_ALERT_WEBHOOK": "{broken"}) is None
    assert webhook_from_env({}) is None


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    sink = Sink()
    home = tmp_path_factory.mktemp("alerting")
    cfg = PlaneConfig(home=home, python=serving_python(), triton_http=free_port(), triton_grpc=free_port(),
                      triton_metrics=free_port(), index_port=free_port(),
                      router_ports=(free_port(), free_port()), prometheus_port=free_port(),
                      faults_enabled=True, alert_webhooks=(sink.url,))
    dp = DataPlane(cfg)
    art = tmp_path_factory.mktemp("alerting-artifacts")
    try:
        dp.start()
        client = DataPlaneClient.from_plane_file(home / "plane.json")
        bundles = {}
        for v in (1, 2):
            b = make_bundle(art / f"b{v}", seed=v)
            ix = make_index(b, art / f"i{v}")
            client.load_version(v, b / "serving_tower.pt", str(ix), 16,
                                json.loads((ix / "index_meta.json").read_text())["fingerprint"])
            bundles[v] = b
        client.router.write_routes(single_version_table(1), 0, "test", "bootstrap")
        panel = write_panel(art / "panel.npz", USERS, list(top_items(bundles[1], USERS, 10)), {"source": "test"})
        dp.start_simulator(panel, 40, home / "sim.json")
        yield {"dp": dp, "cfg": cfg, "client": client, "sink": sink}
    finally:
        dp.stop()
        sink.close()


def _firing(cfg) -> list[dict]:
    doc = httpx.get(f"http://127.0.0.1:{cfg.prometheus_port}/api/v1/alerts").json()
    return [a for a in doc["data"]["alerts"] if a["state"] == "firing"]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_canary_fault_pages_nobody(plane):
    client, cfg = plane["client"], plane["cfg"]
    cur = client.router.routes()
    client.router.write_routes(canary_table(1, 2, 50, "am-canary"), cur.revision, "test", "canary")
    client.router.set_fault(2, error_rate=1.0)
    try:
        time.sleep(12.0)
        paged = [a for a in _firing(cfg) if a["labels"].get("version") == "2"
                 or a["labels"]["alertname"].startswith("DayloopStable")]
        assert paged == [], paged
    finally:
        client.router.clear_faults()
        cur = client.router.routes()
        client.router.write_routes(single_version_table(1), cur.revision, "test", "canary over")


def test_a_fault_of_the_stable_version_fires_and_reaches_the_webhook_and_the_log(plane):
    client, cfg, sink = plane["client"], plane["cfg"], plane["sink"]
    client.router.set_fault(1, error_rate=1.0)
    t0 = time.monotonic()
    try:
        want = {"DayloopStableErrorRatio", "DayloopStableCircuitOpen", "DayloopFallbackShare"}
        firing = _wait(lambda: want <= {a["labels"]["alertname"] for a in _firing(cfg)} and _firing(cfg), 60,
                       f"Prometheus to fire {want}")
        fired_s = time.monotonic() - t0
        delivered = _wait(lambda: want <= {a["labels"]["alertname"] for a in sink.alerts()}, 60,
                          "Alertmanager to deliver them to the webhook")
        delivered_s = time.monotonic() - t0
        stable = [a for a in firing if a["labels"]["alertname"] == "DayloopStableErrorRatio"]
        assert stable and stable[0]["labels"]["version"] == "1"
        assert "runbook" in stable[0]["annotations"]
        log_url = cfg.endpoints()["alert_log_url"]
        logged = _wait(lambda: {a["alertname"] for a in httpx.get(log_url + "/alerts").json()["alerts"]} >= want,
                       30, "the alert log")
        assert logged
        lines = (cfg.log_dir / "alerts.jsonl").read_text().splitlines()
        assert any(json.loads(ln)["alertname"] == "DayloopFallbackShare" for ln in lines)
        assert delivered
        print(f"stable fault: firing in Prometheus {fired_s:.1f} s, at the webhook {delivered_s:.1f} s")
    finally:
        client.router.clear_faults()
    # cleared: the alerts resolve, and the webhook hears that too
    _wait(lambda: "DayloopStableErrorRatio" in {a["labels"]["alertname"] for a in sink.alerts("resolved")}, 90,
          "the resolved notification")
    sim = json.loads((cfg.home / "sim.json").read_text())
    assert sim["failed"] == {}, "the fallback chain answered every user throughout"
