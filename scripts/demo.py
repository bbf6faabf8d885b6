"""The demo: drive the daily loop on the running embedded stack the way a person would.

1. pin the replay calendar (first time only): yesterday is replay day 0;
2. unpause `daily_refresh`: the scheduler starts the run for the last closed day
   (yesterday), which trains the first model, makes it champion (bootstrap) and puts it on
   100% of users on the data plane;
3. start the user simulator on real MovieLens users (clicks follow their next days' ratings);
4. trigger the next logical date (today): a challenger is trained, gated, indexed, deployed
   as a canary and ramped in timed bake steps judged on Prometheus, then promoted or rolled
   back; every route change and every step's analysis is printed with its numbers;
5. print what happened, the rollout's decision beside the truth (the true CTR ratio over the
   whole panel, which the simulator knows: dayloop.simulation.truth) and whether they agree,
   what the users saw, and where to look.

Run through `make demo` (which sets up and starts the stack and the data plane first).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from dayloop.config import load_settings, pin_replay_start
from dayloop.status import render

# The Airflow REST client is test support (tests/airflow_rest.py) that the demo borrows, as
# the benchmarks borrow tests/serving_helpers.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from airflow_rest import AirflowApi, AirflowApiError, generated_password  # noqa: E402

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
    # The report task closes every run and fails it whenever nothing new reached the users.
    return "gate_model" in failed and failed <= {"gate_model", "rollout.report_rollout"}


def start_users(settings, champion_day: str | None, rate: float = 20.0) -> Path | None:
    """Start the user simulator on real users with their held-out future ratings."""
    from dayloop.simulation.panel import panel_from_replay
    from serving.launch import DataPlane, config_from_env

    panel = panel_from_replay(settings, after=champion_day, days=7)
    (settings.home / "serving").mkdir(parents=True, exist_ok=True)
    panel_path = panel.write(settings.home / "serving" / "panel.npz")
    plane = DataPlane(config_from_env())
    stats_path = settings.home / "serving" / "simulator.json"
    plane.stop_service("simulator")
    stats_path.unlink(missing_ok=True)
    plane.start_simulator(panel_path, rate=rate, stats_file=stats_path)
    log(f"user simulator: {panel.n_users} real users at {rate:g} req/s; clicks follow their next 7 days of ratings")
    return stats_path


def describe_table(entry: dict) -> str:
    table = entry.get("table") or {}
    shares: dict[int, float] = {}
    for r in table.get("routes", []):
        shares[r["version"]] = shares.get(r["version"], 0) + (r["end"] - r["start"]) / 100
    split = ", ".join(f"v{v} {p:g}%" for v, p in sorted(shares.items()))
    return f"revision {entry.get('revision')}: {split}  ({entry.get('actor')}: {entry.get('reason')})"


def follow_rollout(api: AirflowApi, run: dict) -> dict:
    """Wait for the run, printing task progress and every route table change as it happens."""
    from serving.client import DataPlaneClient

    client = DataPlaneClient.from_env()
    first = client.router.routes()
    seen = {"rev": first.revision if first else None, "states": {}}
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        current = client.router.routes()
        revision = current.revision if current else None
        if revision != seen["rev"]:
            for entry in reversed(client.router.history(10)):
                if entry["revision"] > (seen["rev"] or 0):
                    log(f"  route {describe_table(entry)}")
            seen["rev"] = revision
        states = {ti["task_id"]: ti.get("state") or "none" for ti in api.task_instances(DAG_ID, run["dag_run_id"])}
        if states != seen["states"]:
            active = [t for t, s in states.items() if s in ("running", "queued", "deferred", "up_for_retry")]
            done = sum(s == "success" for s in states.values())
            log(f"  {done}/{len(states)} tasks done" + (f", now {', '.join(f'{t} ({states[t]})' for t in active)}"
                                                       if active else ""))
            seen["states"] = states
        state = api.run(DAG_ID, run["dag_run_id"])
        if state["state"] in ("success", "failed"):
            return state
        time.sleep(2)
    raise AirflowApiError(f"run {run['dag_run_id']} not finished after an hour")


def xcom(api: AirflowApi, run: dict, task_id: str, key: str = "return_value"):
    try:
        out = api.request("GET", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}/xcomEntries/{key}",
                          params={"deserialize": "true", "stringify": "false"})
    except AirflowApiError:
        return None
    value = (out or {}).get("value")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def rollout_outcome(steps: list[dict], promoted: dict | None, rolled: dict | None) -> str:
    """The outcome the report task gives the rollout (promoted, aborted, rolled_back, failed)."""
    if promoted and promoted.get("promoted"):
        return "promoted"
    if any(s.get("decision") == "aborted" for s in steps):
        return "aborted"
    if rolled and rolled.get("rolled_back"):
        return "rolled_back"
    return "failed"


def print_truth(settings, ctx: dict, steps: list[dict], outcome: str) -> None:
    """The true CTR ratio over the whole panel beside the decision; plain words when they disagree."""
    from dayloop.rollout.report import failed_checks
    from dayloop.simulation.truth import judge_rollout

    try:
        verdict = judge_rollout(settings, ctx["version"], ctx["champion"], ctx["plan"]["thresholds"]["ctr_margin"],
                                outcome, failed_checks(steps))
    except Exception as exc:  # noqa: BLE001 - the truth is extra: the demo still reports the rest
        print(f"  truth: not computed ({type(exc).__name__}: {exc})")
        return
    if verdict is None:  # no simulated users, no truth
        return
    print(f"  truth: {verdict.sentence}")
    if verdict.agrees is False:
        right = "promoted" if verdict.expected == "promoted" else "rolled back"
        print(f"  THE DECISION WAS WRONG: over every simulated user v{verdict.canary} earns {verdict.ratio:.3f}x "
              f"v{verdict.control}'s clicks per list, so it should have been {right}.")


def print_rollout(api: AirflowApi, run: dict, settings) -> None:
    steps = xcom(api, run, "rollout.bake_and_ramp", "steps") or []
    ctx = xcom(api, run, "rollout.deploy_canary") or {}
    if ctx.get("mode") == "canary":
        live = ctx.get("live_check", {})
        print(f"canary v{ctx['version']} vs champion v{ctx['champion']}, plan {ctx['plan']['name']}; live check "
              f"before any user: p99 {live.get('p99_ms')} ms over {live.get('n')} calls, finite={live.get('finite')}")
    for step in steps:
        result = step.get("result") or {}
        print(f"  step {step['index']} at {step['percent']:g}%: {step['decision'].upper()} after "
              f"{result.get('elapsed_s', 0):.0f}s ({len(step.get('looks', []))} looks)")
        for check in (result.get("analysis") or {}).get("checks", []):
            print(f"      {check['name']:<24} {check['phase']:<13} {check['message']}")
        for reason in result.get("reasons", []):
            if not any(reason.endswith(c["message"]) for c in (result.get("analysis") or {}).get("checks", [])):
                print(f"      {reason}")
    report = xcom(api, run, "rollout.report_rollout")
    rolled = xcom(api, run, "rollout.rollback_canary")
    if rolled and rolled.get("rolled_back"):
        print(f"  ROLLED BACK to v{rolled.get('champion')}: {rolled.get('reason')}")
    elif report:
        print(f"  outcome: {report.get('outcome')}" + (f", report {report['report']['html']}" if report.get("report") else ""))
    if ctx.get("mode") == "canary" and steps:
        print_truth(settings, ctx, steps, rollout_outcome(steps, xcom(api, run, "rollout.promote_canary"), rolled))


def print_users(stats_path: Path | None) -> None:
    stats = json.loads(stats_path.read_text()) if stats_path and stats_path.is_file() else {}
    if not stats:
        return
    print(f"Users (simulated, {stats.get('elapsed_s', 0):.0f}s at {stats.get('rate')} req/s): "
          f"{stats.get('sent', 0)} requests sent, {stats.get('ok', 0)} ok, failed {stats.get('failed', {}) or 0}")
    lat = stats.get("latency_ms", {})
    print(f"  latency p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms (client side)")
    for v, pv in sorted(stats.get("per_version", {}).items()):
        print(f"  v{v}: {pv.get('impressions', 0)} lists shown, {pv.get('clicks', 0)} clicks, "
              f"CTR {pv.get('ctr', 0):.3f} clicks/list")


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

    from dayloop.registry import CHAMPION, Registry

    champion = Registry(settings).alias_version(CHAMPION)
    stats_path = None
    if champion is not None:
        log(f"champion v{champion.version} serves 100% of users (route table written by the run)")
        stats_path = start_users(settings, dict(champion.tags).get("dayloop.logical_date"))

    second = wait_for_run_of(api, today, timeout_s=0)
    if second is not None:
        # A logical date runs once; a repeated demo shows the run it already made.
        log(f"logical date {today} already has run {second['dag_run_id']}; showing it")
    else:
        log(f"triggering the next logical date, {today}, from the API (as the UI's Trigger form does); "
            f"its canary rollout uses the {os.environ.get('DAYLOOP_ROLLOUT_PROFILE', 'prod')} plan")
        second = api.trigger(DAG_ID, today, note="demo: second day")
    results.append((today, follow_rollout(api, second)))

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
    print_rollout(api, results[1][1], settings)
    print()
    print(render(settings))
    print()
    print_users(stats_path)
    endpoints = json.loads((Path(os.environ.get("DAYLOOP_VAR", "var")) / "serving" / "plane.json").read_text())
    print()
    print("Where to look:")
    print(f"  Airflow UI : {base}  (user admin, password {password};"
          f" also in {airflow_home}/simple_auth_manager_passwords.json.generated)")
    print("               DAG daily_refresh (the loop; created paused, this demo unpaused it),")
    print("               DAG manual_rollback (created unpaused: Trigger with target version and reason runs at")
    print("               once; for the version already serving it probes every router and repairs if needed)")
    print(f"  MLflow UI  : {mlflow_url}  (experiment dayloop-daily-refresh, model {settings.model_name};"
          " the rollout report is under each canary's run, artifacts/rollout)")
    print(f"  Reports    : {settings.reports_dir}")
    print(f"  Router     : {endpoints['router_urls'][0]}/recommend  (POST {{\"user_id\": 1, \"k\": 10}})")
    print(f"  Prometheus : {endpoints['prometheus_url']}  (e.g. dayloop:router_latency_seconds:p99_30s;"
          " alerts at /alerts)")
    if endpoints.get("alertmanager_url"):
        print(f"  Alerts     : Alertmanager {endpoints['alertmanager_url']}, alert log "
              f"{Path(endpoints['token_file']).parent / 'log' / 'alerts.jsonl'}")
    print(f"  Breakers   : {endpoints['router_urls'][0]}/health (circuit per version; details at"
          " /admin/breakers with the admin token)")
    if stats_path:
        print(f"  Users      : the simulator keeps running; stats in {stats_path}")
    print(f"  Logs       : {os.environ.get('DAYLOOP_LOG_DIR')}")
    print("  Stop it all: make stop")
    # A challenger the offline gate rejects, or one the canary analysis rolls back, is an
    # honest outcome of the loop, not a broken demo; any other failure is.
    states = {ti["task_id"]: ti.get("state") for ti in api.task_instances(DAG_ID, results[1][1]["dag_run_id"])}
    second_ok = (results[1][1]["state"] == "success" or only_gate_said_no(api, results[1][1])
                 or states.get("rollout.rollback_canary") == "success")
    return 0 if results[0][1]["state"] == "success" and second_ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AirflowApiError as exc:
        log(f"error: {exc}")
        sys.exit(1)
