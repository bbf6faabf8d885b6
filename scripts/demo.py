"""The demo: drive the daily loop on the running embedded stack the way a person would.

1. pin the replay calendar (first time only): yesterday is replay day 0;
2. unpause `daily_refresh`: the scheduler starts the run for the last closed day
   (yesterday), which trains the first model and makes it champion (bootstrap);
3. trigger a second run for the next logical date (today): a challenger gated
   against that champion;
4. serve the champion on the data plane (Triton + index service, 100% of users) and
   start the user simulator on real users;
5. print each run, the decisions with their numbers, what the users saw, where to look.

Run through `make demo` (which sets up and starts the stack first).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from dayloop.airflow.client import AirflowApi, AirflowApiError, generated_password
from dayloop.config import load_settings, pin_replay_start
from dayloop.status import render

DAG_ID = "daily_refresh"


def log(msg: str) -> None:
    print(f"[demo {dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def wait_for_run_of(api: AirflowApi, day: dt.date, timeout_s: float = 90.0) -> dict | None:
    """The run of `day` once the scheduler has created it (None if it does not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for run in api.runs(DAG_ID):
            if run.get("logical_date") and run["logical_date"][:10] == day.isoformat():
                return run
        if time.monotonic() >= deadline:
            return None
        time.sleep(2)


def follow(api: AirflowApi, run: dict) -> dict:
    def show(states: dict[str, str]) -> None:
        done = sum(s == "success" for s in states.values())
        running = [t for t, s in states.items() if s in ("running", "queued", "scheduled", "up_for_retry")]
        failed = [t for t, s in states.items() if s in ("failed", "upstream_failed")]
        log(f"  {run['dag_run_id']}: {done}/{len(states)} tasks done"
            + (f", now {', '.join(running)}" if running else "")
            + (f", FAILED {', '.join(failed)}" if failed else ""))

    return api.wait_run(DAG_ID, run["dag_run_id"], timeout_s=1800, on_change=show)


def only_gate_said_no(api: AirflowApi, run: dict) -> bool:
    states = {ti["task_id"]: ti.get("state") for ti in api.task_instances(DAG_ID, run["dag_run_id"])}
    failed = {t for t, s in states.items() if s == "failed"}
    return failed == {"gate_model"}


def serve_and_simulate(settings, seconds: float = 20.0) -> dict | None:
    """Put the champion on the data plane (model + index, 100% of users), start the user
    simulator on real users with their held-out future interactions, report what they saw."""
    from dayloop.registry import CHAMPION, Registry
    from dayloop.rollout.serving import serve_only
    from dayloop.simulation.panel import panel_from_replay
    from serving.client import DataPlaneClient
    from serving.launch import DataPlane, config_from_env

    champion = Registry(settings).alias_version(CHAMPION)
    if champion is None:
        log("no champion yet: nothing to serve")
        return None
    client = DataPlaneClient.from_env()
    out = serve_only(settings, client, champion.version, actor="demo",
                     reason=f"demo: serve champion v{champion.version}")
    log(f"champion v{out['version']} loaded in Triton and the index service; route revision "
        f"{out['revision']} sends 100% of users to it")
    panel = panel_from_replay(settings, after=dict(champion.tags).get("dayloop.logical_date"), days=7)
    (settings.home / "serving").mkdir(parents=True, exist_ok=True)
    panel_path = panel.write(settings.home / "serving" / "panel.npz")
    plane = DataPlane(config_from_env())
    stats_path = settings.home / "serving" / "simulator.json"
    plane.stop_service("simulator")
    stats_path.unlink(missing_ok=True)
    plane.start_simulator(panel_path, rate=20, stats_file=stats_path)
    log(f"user simulator: {panel.n_users} real users, clicks follow their next 7 days of ratings; "
        f"running {seconds:.0f}s before reporting")
    time.sleep(seconds)
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    print()
    print(f"Serving (after {stats.get('elapsed_s', 0):.0f}s of simulated users at {stats.get('rate')} req/s):")
    print(f"  requests {stats.get('sent', 0)} sent, {stats.get('ok', 0)} ok, failed {stats.get('failed', {}) or 0}")
    lat = stats.get("latency_ms", {})
    print(f"  latency  p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms (client side)")
    for v, pv in sorted(stats.get("per_version", {}).items()):
        print(f"  v{v}: {pv.get('impressions', 0)} lists shown, {pv.get('clicks', 0)} clicks, "
              f"CTR {pv.get('ctr', 0):.3f} clicks/list")
    endpoints = client.endpoints
    return {"router": endpoints["router_urls"][0], "prometheus": endpoints["prometheus_url"],
            "stats": str(stats_path)}


def main() -> int:
    settings = load_settings()
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    base = f"http://127.0.0.1:{os.environ.get('AIRFLOW_PORT', '8080')}"
    mlflow_url = os.environ.get("MLFLOW_TRACKING_URI", "")
    password = generated_password(airflow_home)
    api = AirflowApi(base, "admin", password)

    today = dt.datetime.now(dt.timezone.utc).date()
    yesterday = today - dt.timedelta(days=1)
    start = pin_replay_start(settings, yesterday)
    log(f"replay calendar: replay day 0 = {start} (pinned in {settings.replay_start_file})")

    api.wait_healthy()
    api.wait_dag(DAG_ID)
    api.set_paused(DAG_ID, False)
    log(f"unpaused {DAG_ID}; the scheduler now starts the run for the last closed day, {yesterday}")

    results = []
    first = wait_for_run_of(api, yesterday)
    if first is None:
        log("scheduler made no run for yesterday; triggering it")
        first = api.trigger(DAG_ID, yesterday, note="demo: first day")
    results.append((yesterday, follow(api, first)))

    second = wait_for_run_of(api, today, timeout_s=0)
    if second is not None:
        # A logical date runs once; a repeated demo shows the run it already made.
        log(f"logical date {today} already has run {second['dag_run_id']}; showing it")
    else:
        log(f"triggering the next logical date, {today}, from the API (as the UI's Trigger form does)")
        second = api.trigger(DAG_ID, today, note="demo: second day")
    results.append((today, follow(api, second)))

    print()
    print("=" * 78)
    print("Dayloop demo: what happened")
    print("=" * 78)
    for day, run in results:
        failed = [ti["task_id"] for ti in api.task_instances(DAG_ID, run["dag_run_id"])
                  if ti.get("state") in ("failed", "upstream_failed")]
        print(f"run {run['dag_run_id']} (logical date {day}): {run['state'].upper()}"
              + (f"  failed tasks: {', '.join(failed)}" if failed else ""))
    print()
    print(render(settings))
    serving = serve_and_simulate(settings)
    print()
    print("Where to look:")
    print(f"  Airflow UI : {base}  (user admin, password {password};"
          f" also in {airflow_home}/simple_auth_manager_passwords.json.generated)")
    print(f"  MLflow UI  : {mlflow_url}  (experiment dayloop-daily-refresh, model {settings.model_name})")
    print(f"  Reports    : {settings.reports_dir}")
    if serving:
        print(f"  Router     : {serving['router']}/recommend  (POST {{\"user_id\": 1, \"k\": 10}})")
        print(f"  Prometheus : {serving['prometheus']}  (e.g. dayloop:router_latency_seconds:p99_30s)")
        print(f"  Users      : the simulator keeps running; stats in {serving['stats']}")
    print(f"  Logs       : {os.environ.get('DAYLOOP_LOG_DIR')}")
    print("  Stop it all: make stop")
    # A challenger the offline gate rejects is an honest outcome of the loop, not a
    # broken demo; any other failure is.
    ok = results[0][1]["state"] == "success" and (
        results[1][1]["state"] == "success" or only_gate_said_no(api, results[1][1]))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AirflowApiError as exc:
        log(f"error: {exc}")
        sys.exit(1)
