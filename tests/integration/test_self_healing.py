"""The data plane heals itself: per-version circuit breakers, the fallback chain, processes
restarted by their supervisor and restoring their versions, a whole-plane restart with
nothing but the plane's own files. Real Triton, index service, two router replicas and the
user simulator on loopback; faults planted through the routers' fault-injection API or with
``kill -9`` on a service's own pid."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import numpy as np
import pytest

from dayloop.simulation.panel import write_panel
from serving.client import DataPlaneClient
from serving.fileio import file_sha256
from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file
from serving.launch import DataPlane, PlaneConfig
from serving.routing import canary_table, single_version_table
from serving_helpers import free_port, make_bundle, make_index, serving_python, top_items

pytestmark = pytest.mark.integration

USERS = (np.arange(1, 201) * 7).astype(np.int64)
COOLDOWN_S = 2.0


def _with_seen(ix, users, seen_rows, last_day="2026-04-05"):
    """Give an index directory a seen-items file (each user saw ``seen_rows[i]``)."""
    f = write_seen_file(ix / SEEN_FILE, *csr_from_pairs(np.repeat(users, seen_rows.shape[1]),
                                                         seen_rows.reshape(-1)), last_day)
    meta = json.loads((ix / "index_meta.json").read_text())
    meta["seen_items"] = {"file": SEEN_FILE, "fingerprint": file_sha256(f), "last_day": last_day}
    (ix / "index_meta.json").write_text(json.dumps(meta))
    return meta["fingerprint"]


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    home = tmp_path_factory.mktemp("healing")
    cfg = PlaneConfig(home=home, python=serving_python(), triton_http=free_port(), triton_grpc=free_port(),
                      triton_metrics=free_port(), index_port=free_port(),
                      router_ports=(free_port(), free_port()), prometheus_port=free_port(),
                      faults_enabled=True,
                      router_args=("--breaker-cooldown", str(COOLDOWN_S), "--breaker-window", "10",
                                   "--breaker-failures", "3"))
    dp = DataPlane(cfg)
    art = tmp_path_factory.mktemp("healing-artifacts")
    # every user of the panel "saw" three items; the seen table is also what level 1 ranks by
    rng = np.random.default_rng(5)
    seen = np.stack([rng.choice(np.arange(1001, 1301), size=3, replace=False) for _ in USERS])
    versions = {}
    for v in (1, 2):
        b = make_bundle(art / f"b{v}", seed=v, dim=16)
        ix = make_index(b, art / f"i{v}")
        versions[v] = (b, ix, _with_seen(ix, USERS, seen))
    panel = write_panel(art / "panel.npz", USERS, list(top_items(versions[1][0], USERS, 10)),
                        {"source": "test: v1's own top-10"})
    try:
        dp.start(prometheus=False)
        client = DataPlaneClient.from_plane_file(home / "plane.json")
        for v, (b, ix, fp) in versions.items():
            client.load_version(v, b / "serving_tower.pt", str(ix), 16, fp)
        client.router.write_routes(single_version_table(1), 0, "test", "bootstrap")
        yield {"dp": dp, "cfg": cfg, "client": client, "versions": versions, "panel": panel, "seen": seen,
               "routers": cfg.endpoints()["router_urls"], "art": art}
    finally:
        dp.stop()
        assert not dp.status()


def _route(plane, table, reason):
    client = plane["client"]
    cur = client.router.routes()
    rev = client.router.write_routes(table, cur.revision if cur else 0, "test", reason).revision
    assert client.router.wait_applied(rev, 2.0)
    return rev


def _breakers(plane):
    token = plane["cfg"].token_file.read_text().strip()
    return [httpx.get(u + "/admin/breakers", headers={"Authorization": f"Bearer {token}"}).json()
            for u in plane["routers"]]


def _wait_popularity(plane, versions, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(set(map(str, versions)) <= set(b["fallback"]["popularity"]) for b in _breakers(plane)):
            return
        time.sleep(0.1)
    raise AssertionError(f"popularity lists not built: {_breakers(plane)}")


def _ask(http, plane, user, i=0, k=5):
    r = http.post(plane["routers"][i % 2] + "/recommend", json={"user_id": int(user), "k": k})
    assert r.status_code == 200, r.text
    return r.json()


def _reset(plane):
    plane["client"].router.clear_faults()
    _route(plane, single_version_table(1), "reset")
    time.sleep(COOLDOWN_S + 0.2)
    with httpx.Client() as http:  # half-open probes close whatever opened
        for i, u in enumerate(USERS[:20]):
            _ask(http, plane, u, i)


def test_a_nan_canary_is_cut_off_by_its_breaker_and_only_it(plane):
    _reset(plane)
    _route(plane, canary_table(1, 2, 50, "nan-breaker"), "canary 50%")
    _wait_popularity(plane, (1, 2))
    plane["client"].router.set_fault(2, nan_rate=1.0)
    onset = time.monotonic()
    before = [httpx.get(u + "/metrics").text for u in plane["routers"]]
    levels, served, cut_off_at = set(), [], None
    with httpx.Client() as http:
        for i in range(400):
            body = _ask(http, plane, USERS[i % len(USERS)], i)
            levels.add(body["level"])
            served.append(body["version"])
            if i % 4 == 3 and all(b["breakers"].get("2", {}).get("state") == "open" for b in _breakers(plane)):
                cut_off_at = time.monotonic() - onset
                break
    assert cut_off_at is not None, "the canary's circuit never opened"
    assert levels == {0} and set(served) == {1}, "users only ever saw the stable version's lists"
    # each replica let exactly `failures` (3) faulty attempts through before it opened
    line = 'dayloop_router_requests_total{version="2"}'
    opened = [httpx.get(u + "/metrics").text for u in plane["routers"]]
    assert [_sample(t, line) - _sample(b, line) for t, b in zip(opened, before, strict=True)] == [3.0, 3.0]
    print(f"NaN canary: both replicas' circuits open {cut_off_at:.2f} s after the fault, "
          f"{len(served)} sequential requests")
    reports = _breakers(plane)
    for rep in reports:
        assert rep["breakers"]["1"]["state"] == "closed"
        assert rep["trips"][-1]["version"] == 2 and rep["trips"][-1]["faults"] == {"nonfinite": 3}
    # while open, v2 gets no attempts at all: its request counter stands still
    before = [httpx.get(u + "/metrics").text for u in plane["routers"]]
    line = 'dayloop_router_requests_total{version="2"}'
    with httpx.Client() as http:
        for i in range(60):
            assert _ask(http, plane, USERS[i], i)["version"] == 1
    after = [httpx.get(u + "/metrics").text for u in plane["routers"]]
    assert [_sample(t, line) for t in before] == [_sample(t, line) for t in after]
    assert all(_sample(t, 'dayloop_router_breaker_trips_total{version="2"}') == 1.0 for t in after)
    assert all(_sample(t, 'dayloop_router_breaker_state{version="2"}') == 2.0 for t in after)


def _sample(text, head):
    for ln in text.splitlines():
        if ln.startswith(head + " "):
            return float(ln.split()[-1])
    return None


def test_half_open_probe_closes_the_circuit_once_the_fault_is_gone(plane):
    _reset(plane)
    _route(plane, canary_table(1, 2, 50, "recover"), "canary 50%")
    plane["client"].router.set_fault(2, error_rate=1.0)
    with httpx.Client() as http:
        for i in range(40):
            _ask(http, plane, USERS[i], i)
        assert all(b["breakers"]["2"]["state"] == "open" for b in _breakers(plane))
        # still failing after the cool-down: the probe fails and the circuit opens again
        time.sleep(COOLDOWN_S + 0.2)
        for i in range(40):
            _ask(http, plane, USERS[i], i)
        reports = _breakers(plane)
        assert all(b["breakers"]["2"]["state"] == "open" and b["breakers"]["2"]["trips"] == 2 for b in reports)
        assert "half-open probe failed" in reports[0]["trips"][-1]["why"]
        plane["client"].router.clear_faults()
        time.sleep(COOLDOWN_S + 0.2)
        versions = [_ask(http, plane, USERS[i], i)["version"] for i in range(60)]
    assert all(b["breakers"]["2"]["state"] == "closed" for b in _breakers(plane))
    assert versions.count(2) > 10, "v2 serves its users again after the probe"


def test_the_stable_versions_breaker_falls_to_its_popularity_list_never_to_a_canary(plane):
    _reset(plane)
    _route(plane, canary_table(1, 2, 10, "stable-down"), "canary 10%")
    _wait_popularity(plane, (1, 2))
    plane["client"].router.set_fault(1, error_rate=1.0)
    seen = {int(u): set(row.tolist()) for u, row in zip(USERS, plane["seen"], strict=True)}
    table = plane["client"].router.routes().table
    bodies = []
    with httpx.Client() as http:
        for i in range(200):
            bodies.append(_ask(http, plane, USERS[i % len(USERS)], i, k=10))
    stable_users = [b for b in bodies if table.version_for(b["user_id"]) == 1]
    canary_users = [b for b in bodies if table.version_for(b["user_id"]) == 2]
    assert stable_users and canary_users
    # the stable version's users: its popularity list (level 1), without what they had seen
    assert all(b["version"] == 1 for b in stable_users)
    assert {b["level"] for b in stable_users[10:]} == {1}
    for b in stable_users:
        if b["level"] == 1:
            assert len(b["items"]) == 10 and not set(b["items"]) & seen[b["user_id"]]
    # the canary's own users still get the canary: a canary is never anyone's fallback
    assert all(b["version"] == 2 and b["level"] == 0 for b in canary_users)
    assert all(b["breakers"]["1"]["state"] == "open" for b in _breakers(plane))
    # a fallback list's clicks are counted by level, never as a version's
    token_free = [b for b in stable_users if b["level"] == 1][0]
    r = httpx.post(plane["routers"][0] + "/feedback", json={"impression_id": token_free["impression_id"],
                                                          "item_id": token_free["items"][0], "event": "click"})
    assert r.status_code == 200 and r.json()["level"] == 1
    metrics = httpx.get(plane["routers"][0] + "/metrics").text
    assert _sample(metrics, 'dayloop_router_level_clicks_total{level="popularity"}') >= 1.0
    assert _sample(metrics, 'dayloop_router_level_answers_total{level="popularity"}') >= 1.0


def _simulate(plane, tmp_path, seconds, rate=60.0):
    stats = tmp_path / f"sim-{time.monotonic_ns()}.json"
    plane["dp"].start_simulator(plane["panel"], rate, stats, extra=["--duration", str(seconds)])
    return stats


def _sim_done(plane, stats, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stats.is_file():
            doc = json.loads(stats.read_text())
            if doc.get("final"):
                plane["dp"].stop_service("simulator")
                return doc
        time.sleep(0.2)
    plane["dp"].stop_service("simulator")
    raise AssertionError(f"simulator did not finish: {stats.read_text() if stats.is_file() else 'no stats'}")


def _wait_ready(url, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.mark.parametrize("service", ["index_service", "triton", "router-0"])
def test_kill_9_under_load_loses_no_request_and_the_process_restores_itself(plane, tmp_path, service):
    _reset(plane)
    _wait_popularity(plane, (1,))
    dp, cfg = plane["dp"], plane["cfg"]
    ready_url = {"index_service": f"http://{cfg.host}:{cfg.index_port}/ready",
                 "triton": f"http://{cfg.host}:{cfg.triton_http}/v2/health/ready",
                 "router-0": plane["routers"][0] + "/ready"}[service]
    pid = dp.child_pid(service)
    assert pid, f"{service} is not supervised"
    stats = _simulate(plane, tmp_path, 14.0)
    time.sleep(3.0)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    back = _wait_ready(ready_url)
    doc = _sim_done(plane, stats)
    assert dp.child_pid(service) != pid, "the supervisor started a new process"
    assert doc["failed"] == {} and doc["ok"] == doc["sent"] > 500, doc
    if service != "router-0":
        assert sum(int(n) for n in doc["fallback_levels"].values()) > 0, "the gap was bridged by the chain"
    else:
        assert doc["retried_on_other_replica"] > 0, "the other replica answered while it was down"
    # it came back with its versions: lists from the model again on both replicas
    if service == "index_service":
        assert httpx.get(ready_url).json()["versions"] == [1, 2]
    time.sleep(COOLDOWN_S + 0.3)
    with httpx.Client() as http:
        levels = [_ask(http, plane, u, i)["level"] for i, u in enumerate(USERS[:40])]
    assert levels[-20:] == [0] * 20
    print(f"{service}: killed -> ready again in {back - killed:.1f} s; simulator {doc['ok']}/{doc['sent']} "
          f"answered, fallback levels {doc['fallback_levels']}, retried {doc['retried_on_other_replica']}")


def test_the_whole_plane_restarts_and_serves_with_nothing_but_its_own_files(plane):
    """Stop every process and start the plane again: no MLflow, no control plane, no source
    directory of any index (moved away): Triton reloads its repository, the index service its
    local copies, the routers their route table, and the launcher returns only once ready."""
    _reset(plane)
    dp, client = plane["dp"], plane["client"]
    before = client.router.routes()
    dp.stop()
    hidden = plane["art"].with_name(plane["art"].name + "-hidden")
    plane["art"].rename(hidden)
    try:
        t0 = time.monotonic()
        dp.start(prometheus=False)
        took = time.monotonic() - t0
        with httpx.Client() as http:
            bodies = [_ask(http, plane, u, i) for i, u in enumerate(USERS[:50])]
    finally:
        hidden.rename(plane["art"])
    assert {b["level"] for b in bodies} == {0} and {b["version"] for b in bodies} == {1}
    assert client.router.routes().revision == before.revision
    health = client.index.health()
    assert health["versions"] == [1, 2] and health["restore_failed"] == {}
    print(f"whole plane restarted and ready in {took:.1f} s")


def test_a_damaged_local_copy_is_refused_on_restore_not_served(plane):
    dp, cfg = plane["dp"], plane["cfg"]
    copies = cfg.home / "index_service"
    entry = json.loads((copies / "live.json").read_text())["versions"]["2"]
    target = copies / entry["dir"] / "index.faiss"
    original = target.read_bytes()
    target.write_bytes(original[:-64] + b"\0" * 64)
    try:
        dp.stop_service("index_service")
        dp.start_index()
        health = plane["client"].index.health()
        assert health["versions"] == [1] and "2" in health["restore_failed"]
        assert "sha256" in health["restore_failed"]["2"]
    finally:
        target.write_bytes(original)
        dp.stop_service("index_service")
        dp.start_index()
    assert plane["client"].index.health()["versions"] == [1, 2]
