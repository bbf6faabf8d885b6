"""The whole data plane on loopback: Triton, index service, two router replicas, Prometheus
and the user simulator, driven through the control plane's client as a rollout would."""

from __future__ import annotations

import json
import re
import time

import httpx
import numpy as np
import pytest

from dayloop.simulation.panel import write_panel
from serving.client import DataPlaneClient, RouteConflict
from serving.launch import DataPlane, PlaneConfig
from serving.routing import canary_table, single_version_table
from serving_helpers import free_port, make_bundle, make_index, serving_python, top_items

pytestmark = pytest.mark.integration

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')
USERS = (np.arange(1, 201) * 7).astype(np.int64)  # the bundles' user ids


def _index_meta(ix):
    return json.loads((ix / "index_meta.json").read_text())


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    home = tmp_path_factory.mktemp("plane")
    cfg = PlaneConfig(home=home, python=serving_python(), triton_http=free_port(), triton_grpc=free_port(),
                      triton_metrics=free_port(), index_port=free_port(),
                      router_ports=(free_port(), free_port()), prometheus_port=free_port(),
                      faults_enabled=True,
                      # these tests count a faulty canary's every attempt; the breaker, which
                      # would stop the attempts, has its own (tests/integration/test_self_healing.py)
                      router_args=("--breaker-failures", "1000000"))
    dp = DataPlane(cfg)
    art = tmp_path_factory.mktemp("artifacts")
    versions = {}
    for v, dim in ((1, 16), (2, 16), (3, 24)):
        b = make_bundle(art / f"b{v}", seed=v, dim=dim)
        versions[v] = (b, make_index(b, art / f"i{v}"))
    # The users' "future interactions" are what v1 ranks top-10 for them (computed in-process),
    # so v1 is the better model for this panel and v2 (another random model) a worse one.
    panel = write_panel(art / "panel.npz", USERS, list(top_items(versions[1][0], USERS, 10)),
                        {"source": "test: v1's own top-10"})
    try:
        dp.start()
        client = DataPlaneClient.from_plane_file(home / "plane.json")
        for v in (1, 2):
            b, ix = versions[v]
            client.load_version(v, b / "serving_tower.pt", str(ix), 16, _index_meta(ix)["fingerprint"])
        client.router.write_routes(single_version_table(1), 0, "test", "bootstrap")
        yield {"dp": dp, "cfg": cfg, "client": client, "versions": versions, "panel": panel,
               "routers": cfg.endpoints()["router_urls"]}
    finally:
        stopped = dp.stop()
        assert "triton" in stopped and not dp.status()


def _revision(plane) -> int:
    current = plane["client"].router.routes()
    return current.revision if current else 0


def _wait_applied(plane, revision: int, timeout: float = 1.0) -> float:
    """Seconds until every replica applies ``revision`` (fails past ``timeout``)."""
    t0 = time.perf_counter()
    while True:
        applied = plane["client"].router.applied_revisions()
        if all(r >= revision for r in applied.values()):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"replicas {applied} did not apply revision {revision} within {timeout}s")
        time.sleep(0.01)


def _route(plane, table, reason: str) -> int:
    rev = plane["client"].router.write_routes(table, _revision(plane), "test", reason).revision
    _wait_applied(plane, rev)
    return rev


def _metric_sum(plane, name: str, labels: dict[str, str]) -> float:
    """Sum of a counter sample over every router replica's /metrics."""
    total = 0.0
    for url in plane["routers"]:
        for line in httpx.get(url + "/metrics").text.splitlines():
            m = _SAMPLE.match(line)
            if not m or m.group(1) != name:
                continue
            got = dict(_LABEL.findall(m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
    return total


def test_admin_api_needs_the_token(plane):
    url = plane["routers"][0]
    before = _revision(plane)
    assert httpx.get(url + "/admin/routes").status_code == 401
    assert httpx.get(url + "/admin/routes", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    body = {"expected_revision": before, "table": single_version_table(2).as_dict(), "actor": "x", "reason": "y"}
    assert httpx.put(url + "/admin/routes", json=body).status_code == 401
    assert httpx.put(url + "/admin/faults", json={"version": 1, "error_rate": 1.0}).status_code == 401
    assert httpx.put(plane["cfg"].endpoints()["index_url"] + "/admin/indexes/7", json={}).status_code == 401
    assert _revision(plane) == before


def test_tables_naming_unservable_versions_are_refused(plane):
    client, before = plane["client"], _revision(plane)
    with pytest.raises(RouteConflict, match="v5: model not loaded"):
        client.router.write_routes(canary_table(1, 5, 5, "x"), before, "test", "unknown version")
    # model loaded in Triton but no index: refused
    b3, ix3 = plane["versions"][3]
    client.triton.load_version(3, b3 / "serving_tower.pt")
    with pytest.raises(RouteConflict, match="v3: index not loaded"):
        client.router.write_routes(canary_table(1, 3, 5, "x"), before, "test", "no index")
    # an index of another width than the model: refused (24-d model, 16-d index)
    _, ix1 = plane["versions"][1]
    client.index.load_index(3, str(ix1), 16, _index_meta(ix1)["fingerprint"])
    with pytest.raises(RouteConflict, match="24-d vectors but its index is 16-d"):
        client.router.write_routes(canary_table(1, 3, 5, "x"), before, "test", "width mismatch")
    client.index.unload_index(3)
    client.triton.unload_version(3)
    assert _revision(plane) == before
    assert client.router.routes().table.as_dict() == single_version_table(1).as_dict()


def test_the_index_service_refuses_a_mismatched_dimension(plane):
    _, ix1 = plane["versions"][1]
    from serving.client import IndexServiceError

    with pytest.raises(IndexServiceError) as err:
        plane["client"].index.load_index(4, str(ix1), 24)
    assert err.value.status == 409
    assert 4 not in [i["version"] for i in plane["client"].index.list_indexes()]


def test_stale_revision_is_refused(plane):
    client, before = plane["client"], _revision(plane)
    with pytest.raises(RouteConflict, match="stale"):
        client.router.write_routes(single_version_table(1, "other"), before - 1 if before else 5, "test", "stale")
    assert _revision(plane) == before


def test_garbage_is_refused_and_the_router_keeps_serving(plane):
    url = plane["routers"][1]
    bad = [
        ("/recommend", b"not json"),
        ("/recommend", b"{}"),
        ("/recommend", json.dumps({"user_id": "7", "k": 5}).encode()),
        ("/recommend", json.dumps({"user_id": -1, "k": 5}).encode()),
        ("/recommend", json.dumps({"user_id": 2**40, "k": 5}).encode()),
        ("/recommend", json.dumps({"user_id": 7, "k": 0}).encode()),
        ("/recommend", json.dumps({"user_id": 7, "k": 10_000}).encode()),
        ("/recommend", json.dumps({"user_id": 7, "k": 5, "x": 1}).encode()),
        ("/recommend", json.dumps({"user_id": 7.5, "k": 5}).encode()),
        ("/recommend", b"[" * 100_000),
        ("/feedback", json.dumps({"impression_id": "1.1.abc.def", "item_id": 5, "event": "click"}).encode()),
        ("/feedback", json.dumps({"impression_id": "x" * 50, "item_id": 5, "event": "click"}).encode()),
        ("/feedback", json.dumps({"impression_id": "1.1.abcdef.ghijk", "item_id": 5, "event": "buy"}).encode()),
    ]
    for path, body in bad:
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body[:60], r.status_code, r.text)
        assert "detail" in r.json()
    headers = {"Authorization": f"Bearer {plane['cfg'].token_file.read_text().strip()}"}
    for table in ({"salt": "s", "stable": 1, "routes": []}, {"bogus": 1}, "x"):
        r = httpx.put(url + "/admin/routes", headers=headers,
                      json={"expected_revision": _revision(plane), "table": table, "actor": "t", "reason": "r"})
        assert r.status_code == 422, r.text
    # a forged impression id (signature of another key) is refused
    good = httpx.post(url + "/recommend", json={"user_id": 7, "k": 5}).json()
    forged = good["impression_id"].rsplit(".", 1)[0] + ".AAAAAAAAAAAA"
    r = httpx.post(url + "/feedback", json={"impression_id": forged, "item_id": good["items"][0], "event": "click"})
    assert r.status_code == 400
    r = httpx.post(url + "/recommend", json={"user_id": 7, "k": 5})
    assert r.status_code == 200 and len(r.json()["items"]) == 5


def test_same_user_same_version_across_1000_requests(plane):
    _route(plane, canary_table(1, 2, 50, "sticky"), "stickiness check")
    seen: dict[int, set[int]] = {}
    with httpx.Client() as http:
        for i in range(1000):
            user = int(USERS[i % 4])
            r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": user, "k": 3})
            assert r.status_code == 200
            seen.setdefault(user, set()).add(r.json()["version"])
    assert all(len(v) == 1 for v in seen.values()), seen
    _route(plane, single_version_table(1), "back to v1")


def _simulate(plane, tmp_path, rate: float):
    stats = tmp_path / "sim.json"
    plane["dp"].start_simulator(plane["panel"], rate=rate, stats_file=stats, extra=["--report-every", "1"])
    return stats


def _stop_simulator(plane, stats_path):
    assert plane["dp"].stop_service("simulator")
    return json.loads(stats_path.read_text())


def test_zero_failed_requests_through_ramp_rollback_and_a_killed_canary(plane, tmp_path):
    client = plane["client"]
    stats_path = _simulate(plane, tmp_path, rate=40)
    apply_times = []
    try:
        time.sleep(1.5)
        # ramp v2 5 -> 25 -> 50 -> 100 %, then roll back to v1 in one write
        for pct in (5, 25, 50, 100):
            rev = client.router.write_routes(canary_table(1, 2, pct, "ramp-1"), _revision(plane), "test", f"{pct}%")
            apply_times.append(_wait_applied(plane, rev.revision))
            time.sleep(1.5)
        rev = client.router.write_routes(single_version_table(1), _revision(plane), "test", "rollback")
        apply_times.append(_wait_applied(plane, rev.revision))
        time.sleep(1.0)
        # a new version loaded under load, routed at 25%, then its model killed while routed
        client.unload_version(2)
        b2, ix2 = plane["versions"][2]
        client.load_version(2, b2 / "serving_tower.pt", str(ix2), 16, _index_meta(ix2)["fingerprint"])
        _route(plane, canary_table(1, 2, 25, "ramp-2"), "canary again")
        time.sleep(1.0)
        fallbacks_before = _metric_sum(plane, "dayloop_router_fallbacks_total", {"version": "2"})
        client.triton.unload_version(2)  # the canary dies under the route table's feet
        time.sleep(2.0)
        fallbacks_after = _metric_sum(plane, "dayloop_router_fallbacks_total", {"version": "2"})
        _route(plane, single_version_table(1), "canary dead, back to v1")
        time.sleep(0.5)
    finally:
        stats = _stop_simulator(plane, stats_path)
    print(f"\nsimulator: {stats['sent']} sent, {stats['ok']} ok, failed {stats['failed']}; "
          f"apply times {[round(t, 3) for t in apply_times]}")
    assert stats["sent"] >= 300
    assert sum(stats["failed"].values()) == 0, stats["failed"]
    assert stats["ok"] == stats["sent"]
    assert {"1", "2"} <= set(stats["per_version"]), stats["per_version"]
    assert fallbacks_after > fallbacks_before, "the dead canary's requests were not answered by the stable version"
    assert max(apply_times) < 1.0
    # put v2 back for the next tests
    client.index.unload_index(2)
    b2, ix2 = plane["versions"][2]
    client.load_version(2, b2 / "serving_tower.pt", str(ix2), 16, _index_meta(ix2)["fingerprint"])


def _prom(plane, query: str) -> dict[str, float]:
    from prometheus_api_client import PrometheusConnect

    prom = PrometheusConnect(url=plane["cfg"].endpoints()["prometheus_url"], disable_ssl=True)
    return {r["metric"].get("version", ""): float(r["value"][1]) for r in prom.custom_query(query)}


def test_prometheus_queries_return_the_per_version_values_of_the_traffic(plane):
    client = plane["client"]
    _route(plane, canary_table(1, 2, 50, "prom-check"), "prometheus check")
    client.router.set_fault(2, error_rate=0.5)
    counts = {"1": 0, "2": 0}
    clicks = {"1": 0, "2": 0}
    base_req = {v: _metric_sum(plane, "dayloop_router_requests_total", {"version": v}) for v in counts}
    base_err = {v: _metric_sum(plane, "dayloop_router_errors_total", {"version": v}) for v in counts}
    base_clk = {v: _metric_sum(plane, "dayloop_router_clicks_total", {"version": v}) for v in counts}
    try:
        with httpx.Client() as http:
            for i in range(600):
                user = int(USERS[i % USERS.size])
                r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": user, "k": 5})
                assert r.status_code == 200  # canary errors are answered by v1
                body = r.json()
                counts[str(body["version"])] += 1
                if i % 3 == 0:
                    fb = http.post(plane["routers"][i % 2] + "/feedback", json={
                        "impression_id": body["impression_id"], "item_id": body["items"][0], "event": "click"})
                    assert fb.json()["recorded"] is True
                    clicks[str(body["version"])] += 1
    finally:
        client.router.clear_faults()
    req = {v: _metric_sum(plane, "dayloop_router_requests_total", {"version": v}) - base_req[v] for v in counts}
    err = {v: _metric_sum(plane, "dayloop_router_errors_total", {"version": v}) - base_err[v] for v in counts}
    clk = {v: _metric_sum(plane, "dayloop_router_clicks_total", {"version": v}) - base_clk[v] for v in counts}
    assert clk == clicks
    assert err["1"] == 0 and 0.35 < err["2"] / req["2"] < 0.65, (req, err)
    # Prometheus has scraped the same counters: its totals equal the replicas' own
    deadline = time.monotonic() + 15
    while True:
        prom_req = _prom(plane, "sum by (version) (dayloop_router_requests_total)")
        prom_err = _prom(plane, "sum by (version) (dayloop_router_errors_total)")
        want_req = {v: _metric_sum(plane, "dayloop_router_requests_total", {"version": v}) for v in counts}
        want_err = {v: _metric_sum(plane, "dayloop_router_errors_total", {"version": v}) for v in counts}
        if all(prom_req.get(v) == want_req[v] for v in counts) and prom_err.get("2") == want_err["2"]:
            break
        assert time.monotonic() < deadline, (prom_req, want_req, prom_err, want_err)
        time.sleep(0.5)
    # the recording rules the rollout reads see the canary's error ratio and no errors on v1
    deadline = time.monotonic() + 15
    while True:
        ratio = _prom(plane, "dayloop:router_error_ratio:30s")
        ctr = _prom(plane, "dayloop:router_ctr:5m")
        if ratio.get("2", 0) > 0.2 and "1" in ratio and "1" in ctr:
            break
        assert time.monotonic() < deadline, (ratio, ctr)
        time.sleep(0.5)
    assert ratio["1"] == 0.0
    assert 0.2 < ratio["2"] < 0.8
    # clicks per list shown (a list can earn several clicks: earlier tests' simulated users do)
    assert 0.0 < ctr["1"] < 10.0
    p99 = _prom(plane, "dayloop:router_latency_seconds:p99_30s")
    assert set(p99) >= {"1", "2"} and all(0 < x < 2 for x in p99.values()), p99
    _route(plane, single_version_table(1), "end of prometheus check")


def test_fault_injection_is_off_unless_configured(plane, tmp_path):
    """A router started without the flag has no fault endpoint (404 even with the token)."""
    from serving_helpers import Service

    cfg = plane["cfg"]
    port = free_port()
    svc = Service("router-nofaults", [str(serving_python()), "-m", "serving.router", "--port", str(port),
                                       "--triton-grpc", f"127.0.0.1:{cfg.triton_grpc}",
                                       "--index-url", cfg.endpoints()["index_url"],
                                       "--store-url", cfg.store_url, "--token-file", str(cfg.token_file)],
                  tmp_path)
    try:
        svc.wait_http(f"http://127.0.0.1:{port}/health")
        headers = {"Authorization": f"Bearer {cfg.token_file.read_text().strip()}"}
        r = httpx.put(f"http://127.0.0.1:{port}/admin/faults", headers=headers, json={"version": 1, "error_rate": 1})
        assert r.status_code == 404
        assert httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": 7, "k": 3}).status_code == 200
    finally:
        svc.stop()


def test_canary_faults_are_counted_and_never_seen_by_users(plane):
    client = plane["client"]
    _route(plane, canary_table(1, 2, 50, "faults"), "fault check")
    before = {name: _metric_sum(plane, name, {"version": "2"}) for name in
              ("dayloop_router_nonfinite_total", "dayloop_router_fallbacks_total")}
    timeouts_before = _metric_sum(plane, "dayloop_router_errors_total", {"version": "2", "reason": "timeout"})
    served = set()
    try:
        with httpx.Client() as http:
            client.router.set_fault(2, nan_rate=1.0)
            for i in range(60):
                r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": int(USERS[i]), "k": 5})
                assert r.status_code == 200 and all(np.isfinite(r.json()["scores"]))
                served.add(r.json()["version"])
            nan_count = _metric_sum(plane, "dayloop_router_nonfinite_total", {"version": "2"})
            client.router.set_fault(2, latency_ms=400)  # past the 0.25 s canary timeout
            for i in range(20):
                r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": int(USERS[i]), "k": 5})
                assert r.status_code == 200
                served.add(r.json()["version"])
    finally:
        client.router.clear_faults()
    assert served == {1}, "a failing canary's answer reached a user"
    assert nan_count - before["dayloop_router_nonfinite_total"] >= 20
    assert _metric_sum(plane, "dayloop_router_errors_total", {"version": "2", "reason": "timeout"}) - timeouts_before >= 5
    assert _metric_sum(plane, "dayloop_router_fallbacks_total", {"version": "2"}) - before["dayloop_router_fallbacks_total"] >= 25
    _route(plane, single_version_table(1), "end of fault check")


def test_a_worse_model_earns_fewer_clicks_from_the_simulated_users(plane, tmp_path):
    _route(plane, canary_table(1, 2, 50, "ctr-check"), "ctr check")
    stats_path = _simulate(plane, tmp_path, rate=40)
    try:
        time.sleep(8)
    finally:
        stats = _stop_simulator(plane, stats_path)
        _route(plane, single_version_table(1), "end of ctr check")
    pv = stats["per_version"]
    print(f"\nCTR v1 {pv['1']['ctr']:.3f} ({pv['1']['impressions']} lists), "
          f"v2 {pv['2']['ctr']:.3f} ({pv['2']['impressions']} lists)")
    assert sum(stats["failed"].values()) == 0
    assert pv["1"]["impressions"] >= 50 and pv["2"]["impressions"] >= 50
    assert pv["1"]["ctr"] > 3 * pv["2"]["ctr"]


def test_served_lists_through_the_router_leave_out_what_the_user_had_seen(plane, tmp_path):
    """v6 = v1's model with an index that carries a seen-items file (each user has seen
    v1's top-3 for them): every list the routers serve has k items, none of them seen."""
    import shutil

    from serving.fileio import file_sha256
    from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file

    client = plane["client"]
    b1, ix1 = plane["versions"][1]
    ix6 = tmp_path / "i6"
    shutil.copytree(ix1, ix6)
    users = USERS[:40]
    top = top_items(b1, users, 3)
    seen_file = write_seen_file(ix6 / SEEN_FILE, *csr_from_pairs(np.repeat(users, 3), top.reshape(-1)),
                                "2026-04-05")
    meta = _index_meta(ix6)
    meta["seen_items"] = {"file": SEEN_FILE, "fingerprint": file_sha256(seen_file), "last_day": "2026-04-05"}
    (ix6 / "index_meta.json").write_text(json.dumps(meta))
    client.load_version(6, b1 / "serving_tower.pt", str(ix6), 16, meta["fingerprint"])
    assert client.index.get_index(6)["seen_items"]["last_day"] == "2026-04-05"
    want = top_items(b1, users, 8)
    try:
        _route(plane, single_version_table(6), "seen-items check")
        with httpx.Client() as http:
            for i, user in enumerate(users):
                r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": int(user), "k": 5})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["version"] == 6
                assert len(body["items"]) == 5 and not set(body["items"]) & set(top[i].tolist()), (user, body)
                assert body["items"] == [x for x in want[i].tolist() if x not in set(top[i].tolist())][:5]
            # v1 (an index without the file) still serves, unfiltered: its top-3 come back.
            _route(plane, single_version_table(1), "back to v1")
            r = http.post(plane["routers"][0] + "/recommend", json={"user_id": int(users[0]), "k": 5}).json()
            assert r["version"] == 1 and r["items"][:3] == top[0].tolist()
    finally:
        _route(plane, single_version_table(1), "end of seen-items check")
        client.unload_version(6)
