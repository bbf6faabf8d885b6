"""The whole daily loop under the real scheduler and triggerer (`airflow standalone`, not
`dags test`), against the live data plane with simulated users running the whole time.

One embedded deployment, consecutive days, in order (each test depends on the state the
previous ones left, as a real deployment would):

1. the scheduler's own run bootstraps v1, which the DAG puts on 100% of users;
2. a healthy challenger is promoted through every step, with the scheduler and triggerer
   restarted while a step bakes (the deferred bake resumes and finishes);
3. A/A: the champion's own bundle registered again (a planted case) is promoted by the demo
   profile's CTR test, not rolled back by a false alarm;
4-6. a canary emitting NaN / with added latency / with an error rate is rolled back;
7. a model that passes the offline gate but serves the wrong users (planted training-serving
   skew) is rolled back by the online CTR test;
8. too little traffic: inconclusive, bakes to its maximum, fails safe;
9. a run marked failed by a person while its canary bakes never reaches its rollback task;
   the run listener (plugins/) puts the champion back;
10. a manual rollback during a ramp wins; a rollback to an unknown version is refused;
11. malformed Params are refused and create no run;
12. manual_rollback, never unpaused by anyone, repairs a champion whose index was unloaded
    behind its back.

Each asserts the route table, the aliases, the version tags and zero failed user requests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"
DAG = "daily_refresh"
# Shorter bakes than the demo profile, sized for the simulator's 20 requests/s.
FAST = {"bake_seconds": [15, 15, 12], "max_bake_seconds": [90, 90, 90],
        "min_requests": [20, 60, 80], "min_impressions": [20, 60, 80]}
# Margin for the small synthetic world (see tests/integration/test_daily_refresh_dagtest.py).
BASE = {"noninferiority_margin": 0.3, "rollout_profile": "demo"}
SCENARIOS = ["aa", "healthy", "nan", "latency", "errors", "worse", "starved", "killed", "manual"]
# The replay calendar starts at the healthy day whatever scenarios come before it, so each
# day keeps its synthetic data when a scenario is added (the A/A day is a history day).
CALENDAR_START = "healthy"
# Longer than the stack start plus the scheduled bootstrap run (test 1) take on 2 cores.
MIDNIGHT_GUARD_S = 12 * 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AlertSink:
    """The webhook the rollback alerts are posted to (a stand-in for Slack/Alertmanager)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from serving.launch import DataPlane, PlaneConfig
    from serving_helpers import serving_python

    var = tmp_path_factory.mktemp("e2e-loop")
    # The days below are fixed now, and the scheduler makes a run for every day that closes
    # while its DAG is unpaused. Test 1 turns that off once the bootstrap has run; a start
    # too close to midnight UTC waits for the new day rather than race it.
    now = dt.datetime.now(dt.timezone.utc)
    to_midnight = (dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(),
                                       tzinfo=dt.timezone.utc) - now).total_seconds()
    if to_midnight < MIDNIGHT_GUARD_S:
        print(f"\n{to_midnight:.0f}s to midnight UTC: waiting for the new day before scheduling")
        time.sleep(to_midnight + 30)
    today = dt.datetime.now(dt.timezone.utc).date()
    # The scheduler starts runs only for logical dates in the past, so the scenarios take the
    # days before yesterday (the scheduled bootstrap's day); the replay calendar starts there.
    first = today - dt.timedelta(days=len(SCENARIOS) + 1)
    days = {"bootstrap": today - dt.timedelta(days=1), "refused": today}
    days.update({name: first + dt.timedelta(days=i) for i, name in enumerate(SCENARIOS)})
    assert days["manual"] == today - dt.timedelta(days=2)
    assert days[CALENDAR_START] == today - dt.timedelta(days=9)
    alerts = AlertSink()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "DAYLOOP"))}
    env.update({
        "DAYLOOP_VAR": str(var),
        "AIRFLOW_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()),
        "DAYLOOP_SOURCE": "synthetic",
        "DAYLOOP_TRAIN_WINDOW_DAYS": "14",
        "DAYLOOP_SYNTH_USERS": "1500",
        "DAYLOOP_REPLAY_START": days[CALENDAR_START].isoformat(),
        "DAYLOOP_ROLLOUT_PROFILE": "demo",
        "DAYLOOP_PLANT_FAULTS": f"{days['worse']}:serving_skew,{days['aa']}:champion_copy",
        "AIRFLOW_CONN_DAYLOOP_ALERT_WEBHOOK": json.dumps({"conn_type": "http", "host": alerts.url}),
        "AIRFLOW__CORE__PARALLELISM": "2",
    })
    cfg = PlaneConfig(home=var / "serving", python=serving_python(), triton_http=_free_port(),
                      triton_grpc=_free_port(), triton_metrics=_free_port(), index_port=_free_port(),
                      router_ports=(_free_port(), _free_port()), prometheus_port=_free_port(), faults_enabled=True)
    plane = DataPlane(cfg)
    stack_started = False
    try:
        plane.start()
        plane.write_plane_file()
        proc = subprocess.run(["bash", str(STACK), "start"], env=env, capture_output=True, text=True, timeout=400)
        stack_started = True
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield {"env": env, "var": var, "days": days, "plane": plane, "alerts": alerts, "times": {}}
    finally:
        plane.stop()
        if stack_started:
            subprocess.run(["bash", str(STACK), "stop"], env=env, capture_output=True, text=True, timeout=120)
            for name in ("airflow", "mlflow"):
                assert not (var / "run" / f"{name}.pgid").exists(), f"{name} still recorded as running"
        alerts.close()


# --------------------------------------------------------------------------- helpers


def _api(loop):
    from airflow_rest import AirflowApi, generated_password

    return AirflowApi(f"http://127.0.0.1:{loop['env']['AIRFLOW_PORT']}", "admin",
                      generated_password(loop["var"] / "airflow"))


def _client(loop):
    from serving.client import DataPlaneClient

    return DataPlaneClient.from_plane_file(loop["var"] / "serving" / "plane.json")


@pytest.fixture
def registry(loop, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{loop['env']['MLFLOW_PORT']}")
    monkeypatch.setenv("DAYLOOP_HOME", str(loop["var"] / "dayloop"))
    from dayloop.config import load_settings
    from dayloop.registry import Registry

    return Registry(load_settings())


def _failure_log(loop) -> str:
    """The error/warning lines of every task log, so a failed assertion says why."""
    lines = []
    for path in sorted((loop["var"] / "airflow" / "logs").rglob("attempt=*.log")):
        errors = [line[:1500] for line in path.read_text(errors="replace").splitlines()
                  if '"level":"error"' in line or '"level":"warning"' in line]
        if errors:
            lines.append(f"--- {path.relative_to(loop['var'])}")
            lines.extend(errors[-8:])
    return "\n".join(lines[-200:]) or "no error lines in task logs"


def _states(loop, run) -> dict[str, str]:
    return {ti["task_id"]: ti.get("state") or "none" for ti in _api(loop).task_instances(DAG, run["dag_run_id"])}


def _routes(loop) -> dict:
    current = _client(loop).router.routes()
    return current.as_dict() if current else {"revision": 0, "table": None}


def _only(loop) -> int | None:
    """The version with 100% of users, or None while two are routed."""
    routes = _routes(loop)["table"]["routes"]
    return routes[0]["version"] if len(routes) == 1 else None


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _canary(loop) -> int | None:
    table = _routes(loop)["table"]
    versions = {r["version"] for r in table["routes"]}
    others = versions - {table["stable"]}
    return others.pop() if others else None


def _user_failures(loop) -> dict:
    stats = json.loads((loop["var"] / "serving" / "simulator.json").read_text())
    return {k: v for k, v in stats["failed"].items() if v}


def _trigger(loop, name: str, overrides: dict | None = None) -> dict:
    conf = dict(BASE)
    if overrides is not None:
        conf["rollout_overrides"] = overrides
    return _api(loop).trigger(DAG, loop["days"][name], conf=conf, note=f"e2e: {name}")


def _day_version(loop, registry, name: str) -> int | None:
    """The version registered for a scenario's day (its ``dayloop.logical_date`` tag)."""
    found = registry.version_for_date(loop["days"][name].isoformat())
    return int(found.version) if found is not None else None


def _finish(loop, run, timeout_s: float = 1200) -> dict:
    return _api(loop).wait_run(DAG, run["dag_run_id"], timeout_s=timeout_s)


def _assert_rolled_back(loop, registry, run, version: int, champion: int, reason_has: str) -> dict:
    done = _finish(loop, run)
    states = _states(loop, run)
    assert done["state"] == "failed", states
    assert states["rollout.rollback_canary"] == "success", _failure_log(loop)
    assert states["rollout.report_rollout"] == "failed"
    assert states["rollout.promote_canary"] == "upstream_failed"
    assert _only(loop) == champion
    assert int(registry.alias_version("champion").version) == champion
    assert registry.alias_version("challenger") is None
    tags = dict(registry.get_version(version).tags)
    assert tags["dayloop.rollout.status"] == "rolled_back", tags
    assert reason_has in tags["dayloop.rollout.reason"], tags["dayloop.rollout.reason"]
    assert version not in _client(loop).triton.ready_versions()
    alerts = [a for a in loop["alerts"].received if a.get("version") == version]
    assert alerts and alerts[-1]["kind"] == "rollback" and reason_has in alerts[-1]["reason"]
    assert _user_failures(loop) == {}
    return tags


def _fault_scenario(loop, registry, name: str, fault: dict, reason_has: str) -> int:
    """Trigger the day, inject the fault on its canary once routed, assert the rollback;
    returns the canary's version."""
    champion = int(registry.alias_version("champion").version)
    run = _trigger(loop, name, FAST)
    canary = _wait(lambda: _canary(loop), 900, f"the {name} canary to be routed", poll_s=0.2)
    assert canary == _day_version(loop, registry, name), "the canary is not this run's version"
    client = _client(loop)
    client.router.set_fault(canary, **fault)
    onset = time.monotonic()
    try:
        _wait(lambda: _only(loop) == champion, 180, "100% back on the champion", poll_s=0.2)
        loop["times"][name] = time.monotonic() - onset
        print(f"\n{name}: fault onset -> 100% on champion v{champion}: {loop['times'][name]:.1f} s")
        _assert_rolled_back(loop, registry, run, canary, champion, reason_has)
    finally:
        client.router.clear_faults()
    return canary


def _assert_cut_off_by_breaker(loop, registry, canary: int) -> None:
    """The canary's breakers tripped, the bake cut it off (one route write, the trip in the
    step's reasons) and the rollback task found it already unrouted."""
    tags = dict(registry.get_version(canary).tags)
    assert "circuit breaker opened on v%d" % canary in tags["dayloop.rollout.reason"], tags
    history = _client(loop).router.history(limit=20)
    cut = [r for r in history if r["actor"] == f"rollout/v{canary}/breaker"]
    assert cut and "circuit-breaker cut-off" in cut[0]["reason"], history[:3]


# --------------------------------------------------------------------------- scenarios


def test_1_the_scheduled_run_bootstraps_the_champion_and_serves_it(loop, registry):
    api = _api(loop)
    api.wait_healthy()
    api.wait_dag(DAG)
    # the emergency tool is unpaused from its creation: nobody has to find the toggle first
    assert api.wait_dag("manual_rollback")["is_paused"] is False
    api.set_paused(DAG, False)
    # catchup=False: unpausing makes the scheduler run the last closed day by itself.
    day = loop["days"]["bootstrap"].isoformat()
    run = _wait(lambda: next((r for r in api.runs(DAG) if (r.get("logical_date") or "")[:10] == day), None),
                120, "the scheduled run", poll_s=2)
    assert run["run_type"] == "scheduled"
    done = _finish(loop, run)
    assert done["state"] == "success", _failure_log(loop)
    assert int(registry.alias_version("champion").version) == 1
    assert _only(loop) == 1
    assert 1 in _client(loop).triton.ready_versions()
    # From here on the scenarios trigger their own days: a day closing during the suite must
    # not add a scheduled run (and a version) between them. Triggered runs still run.
    loop["env"]["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    restart = subprocess.run(["bash", str(STACK), "restart-airflow"], env=loop["env"], capture_output=True,
                             text=True, timeout=400)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    api.wait_dag(DAG)
    # Now the users arrive: the synthetic world's users, clicking what they truly like.
    panel = loop["var"] / "serving" / "panel.npz"
    env = dict(loop["env"], DAYLOOP_HOME=str(loop["var"] / "dayloop"))
    subprocess.run([sys.executable, "-m", "dayloop.simulation.panel", "--synthetic", "--out",
                    str(panel), "--ds", day], env=env, check=True, capture_output=True, timeout=120)
    stats = loop["var"] / "serving" / "simulator.json"
    loop["plane"].start_simulator(panel, rate=20, stats_file=stats)
    _wait(lambda: stats.is_file() and json.loads(stats.read_text()).get("ok", 0) > 0, 60, "the first answered users")
    assert _user_failures(loop) == {}


def test_2_a_healthy_challenger_is_promoted_across_a_scheduler_and_triggerer_restart(loop, registry):
    run = _trigger(loop, "healthy", FAST)
    canary = _wait(lambda: _canary(loop), 900, "the canary to be routed", poll_s=0.5)
    assert canary == _day_version(loop, registry, "healthy") == 2

    def baking_step_1():
        shares = {r["version"]: r["end"] - r["start"] for r in _routes(loop)["table"]["routes"]}
        return shares.get(canary) == 5000 and _states(loop, run).get("rollout.bake_and_ramp") == "deferred"

    _wait(baking_step_1, 120, "step 1 (50%) to bake in the triggerer")
    restart = subprocess.run(["bash", str(STACK), "restart-airflow"], env=loop["env"], capture_output=True,
                             text=True, timeout=400)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    done = _finish(loop, run)
    assert done["state"] == "success", _failure_log(loop)
    states = _states(loop, run)
    assert states["rollout.rollback_canary"] == "skipped" and states["rollout.retire_previous"] == "success"
    assert _only(loop) == 2
    assert int(registry.alias_version("champion").version) == 2
    assert int(registry.alias_version("previous").version) == 1
    assert registry.alias_version("challenger") is None
    tags = dict(registry.get_version(2).tags)
    assert tags["dayloop.rollout.status"] == "promoted"
    for i in range(3):
        assert tags[f"dayloop.rollout.step{i}"].startswith("pass"), tags
    reasons = [h["reason"] for h in _client(loop).router.history(20)]
    assert any("ramp canary v2 to 50%" in r for r in reasons) and any("ramp canary v2 to 100%" in r for r in reasons)
    assert 1 not in _client(loop).triton.ready_versions()  # retired after the grace period
    report = loop["var"] / "dayloop" / "reports" / "rollouts" / loop["days"]["healthy"].isoformat()
    assert (report / "rollout_report.html").is_file()
    assert _user_failures(loop) == {}


def test_3_an_aa_canary_the_champions_own_bundle_is_promoted_by_the_ctr_test(loop, registry):
    champion = int(registry.alias_version("champion").version)
    run = _trigger(loop, "aa")  # the demo profile as is, CTR test included
    done = _finish(loop, run)
    assert done["state"] == "success", _failure_log(loop)
    copy = _day_version(loop, registry, "aa")
    assert copy is not None and copy != champion
    tags = dict(registry.get_version(copy).tags)
    assert tags["gate.offline.decision"] == "pass", tags
    assert tags["dayloop.rollout.status"] == "promoted", tags
    ctr_steps = [k for k in tags if k.startswith("dayloop.rollout.step") and k.endswith(".ctr")]
    assert ctr_steps and all("adjusted ratio" in tags[k] for k in ctr_steps), tags
    assert _only(loop) == copy
    assert int(registry.alias_version("champion").version) == copy
    assert int(registry.alias_version("previous").version) == champion
    assert _user_failures(loop) == {}


def test_4_a_challenger_emitting_nan_is_rolled_back_at_the_first_step(loop, registry):
    canary = _fault_scenario(loop, registry, "nan", {"nan_rate": 1.0}, "nonfinite")
    _assert_cut_off_by_breaker(loop, registry, canary)
    tags = dict(registry.get_version(canary).tags)
    assert tags["dayloop.rollout.step0"].startswith("fail") and "dayloop.rollout.step1" not in tags


def test_5_added_latency_on_the_canary_is_rolled_back(loop, registry):
    _fault_scenario(loop, registry, "latency", {"latency_ms": 150}, "latency_p99")


def test_6_an_error_rate_on_the_canary_is_rolled_back(loop, registry):
    canary = _fault_scenario(loop, registry, "errors", {"error_rate": 0.5}, "injected_error")
    _assert_cut_off_by_breaker(loop, registry, canary)


def test_7_a_worse_model_that_passes_the_offline_gate_is_rolled_back_by_the_ctr_test(loop, registry):
    champion = int(registry.alias_version("champion").version)
    run = _trigger(loop, "worse")  # the demo profile as is: its windows are sized for the CTR test
    done = _finish(loop, run)
    version = max(int(v.version) for v in registry.client.search_model_versions(f"name = '{registry.name}'"))
    tags = dict(registry.get_version(version).tags)
    assert tags["gate.offline.decision"] == "pass", "the planted skew must get past the offline gate"
    assert done["state"] == "failed"
    _assert_rolled_back(loop, registry, run, version, champion, "ctr")


def test_8_too_little_traffic_is_inconclusive_bakes_longer_then_fails_safe(loop, registry):
    champion = int(registry.alias_version("champion").version)
    run = _trigger(loop, "starved", {"min_requests": 100000, "min_impressions": 100000,
                                     "bake_seconds": 10, "max_bake_seconds": 25})
    canary = _wait(lambda: _canary(loop), 900, "the canary to be routed")
    tags = _assert_rolled_back(loop, registry, run, canary, champion, "failing safe")
    assert "no passing analysis after" in tags["dayloop.rollout.reason"]
    assert "too few" in tags["dayloop.rollout.reason"]


def test_9_a_run_marked_failed_while_it_bakes_is_cleared_by_the_run_listener(loop, registry):
    champion = int(registry.alias_version("champion").version)
    run = _trigger(loop, "killed", {**FAST, "bake_seconds": [120, 60, 60], "max_bake_seconds": [240, 120, 120]})
    canary = _wait(lambda: _canary(loop), 900, "the canary to be routed")
    assert canary == _day_version(loop, registry, "killed")
    _wait(lambda: _states(loop, run).get("rollout.bake_and_ramp") == "deferred", 60, "the bake to defer")
    # What "Mark run as failed" in the UI does: the run ends, its rollback task never runs.
    t0 = time.monotonic()
    _api(loop).set_run_state(DAG, run["dag_run_id"], "failed")
    _wait(lambda: _only(loop) == champion, 60, "the listener to put the champion back", poll_s=0.2)
    print(f"\nrun marked failed -> 100% on champion v{champion}: {time.monotonic() - t0:.1f} s")
    states = _states(loop, run)
    assert states["rollout.rollback_canary"] in ("skipped", "none", "removed"), states
    latest = _routes(loop)
    assert latest["actor"] == f"{DAG}/{run['dag_run_id']}/listener", latest
    tags = _wait(lambda: (t := dict(registry.get_version(canary).tags)).get("dayloop.rollout.status") == "rolled_back"
                 and t, 30, "the canary's rollback tags")
    assert "marked failed" in tags["dayloop.rollout.reason"] or "manually set" in tags["dayloop.rollout.reason"], tags
    assert int(registry.alias_version("champion").version) == champion
    assert registry.alias_version("challenger") is None
    _wait(lambda: canary not in _client(loop).triton.ready_versions(), 30, "the canary to be unloaded")
    alerts = _wait(lambda: [a for a in loop["alerts"].received if a.get("version") == canary], 30, "the alert")
    assert alerts[-1]["kind"] == "rollback" and alerts[-1]["run_id"] == run["dag_run_id"]
    assert _user_failures(loop) == {}


def test_10_a_manual_rollback_during_a_ramp_wins_and_bad_requests_change_nothing(loop, registry):
    from airflow_rest import AirflowApiError

    api = _api(loop)
    champion = int(registry.alias_version("champion").version)
    previous = int(registry.alias_version("previous").version)
    run = _trigger(loop, "manual", {**FAST, "bake_seconds": [60, 60, 60], "max_bake_seconds": [120, 120, 120]})
    canary = _wait(lambda: _canary(loop), 900, "the canary to be routed")
    before = _routes(loop)

    # A version that does not exist: the run fails at validation, nothing changes.
    bad = api.trigger("manual_rollback", conf={"target_version": "999", "reason": "e2e: unknown version"})
    assert api.wait_run("manual_rollback", bad["dag_run_id"], timeout_s=300)["state"] == "failed"
    assert _routes(loop)["revision"] == before["revision"]
    assert int(registry.alias_version("champion").version) == champion
    # A malformed form value never becomes a run.
    n_runs = len(api.runs("manual_rollback"))
    with pytest.raises(AirflowApiError):
        api.trigger("manual_rollback", conf={"target_version": "v1", "reason": "e2e: malformed"})
    with pytest.raises(AirflowApiError):
        api.trigger("manual_rollback", conf={"target_version": "1"})  # no reason
    assert len(api.runs("manual_rollback")) == n_runs

    t0 = time.monotonic()
    good = api.trigger("manual_rollback", conf={"target_version": "previous", "reason": "e2e: canary looks off"})
    _wait(lambda: _only(loop) == previous, 120, f"100% on v{previous}", poll_s=0.2)
    loop["times"]["manual"] = time.monotonic() - t0
    print(f"\nmanual rollback: trigger -> 100% on v{previous}: {loop['times']['manual']:.1f} s")
    assert api.wait_run("manual_rollback", good["dag_run_id"], timeout_s=300)["state"] == "success"
    latest = _routes(loop)
    assert latest["actor"] == "manual_rollback/admin" and "canary looks off" in latest["reason"]

    done = _finish(loop, run)
    states = _states(loop, run)
    assert done["state"] == "failed"
    assert states["rollout.bake_and_ramp"] == "failed" and states["rollout.rollback_canary"] == "success"
    # The daily run stopped without writing over the manual rollback.
    assert _routes(loop)["revision"] == latest["revision"]
    assert int(registry.alias_version("champion").version) == previous
    assert int(registry.alias_version("previous").version) == champion
    assert registry.alias_version("challenger") is None
    tags = dict(registry.get_version(previous).tags)
    assert tags["dayloop.manual_rollback.actor"] == "admin"
    assert tags["dayloop.manual_rollback.reason"] == "e2e: canary looks off"
    assert dict(registry.get_version(canary).tags)["dayloop.rollout.status"] == "aborted"
    assert canary not in _client(loop).triton.ready_versions()
    assert _user_failures(loop) == {}


def test_11_a_bad_param_is_refused_and_creates_no_run(loop):
    from airflow_rest import AirflowApiError

    api = _api(loop)
    before = len(api.runs(DAG))
    for conf in ({"train_epochs": -3}, {"rollout_profile": "fast"}, {"deploy": "maybe"}):
        with pytest.raises(AirflowApiError) as err:
            api.trigger(DAG, loop["days"]["refused"], conf=conf)
        assert "400" in str(err.value) or "422" in str(err.value)
    assert len(api.runs(DAG)) == before


def test_12_manual_rollback_repairs_a_champion_whose_index_was_unloaded_behind_its_back(loop, registry):
    """The table still routes 100% to the champion but its index is gone from the index
    service (unloaded with the admin API, not by the control plane): users get the routers'
    popularity fallback. manual_rollback to ``champion``, triggered through the REST API with
    no unpausing, probes what serves, reloads the pair and records the repair."""
    api, client = _api(loop), _client(loop)
    champion = int(registry.alias_version("champion").version)
    before = _routes(loop)["revision"]
    client.index.unload_index(champion)
    assert not client.router.probe(champion)["serving"]
    t0 = time.monotonic()
    run = api.trigger("manual_rollback", conf={"target_version": "champion", "reason": "e2e: index gone"})
    assert api.wait_run("manual_rollback", run["dag_run_id"], timeout_s=300)["state"] == "success"
    took = time.monotonic() - t0
    print(f"\nmanual rollback repair: trigger -> champion v{champion} serving again: {took:.1f} s")
    assert client.router.probe(champion)["serving"]
    assert _routes(loop)["revision"] == before
    tags = dict(registry.get_version(champion).tags)
    assert "index not loaded" in tags["dayloop.manual_rollback.repaired"], tags
    assert _user_failures(loop) == {}
