"""How fast the rollout gets users back on a good version.

On a data plane of its own (Triton, index service, two routers, Prometheus at a 1 s scrape,
the user simulator at 20 requests/s) and a local MLflow registry, with the demo plan:

* fault onset -> 100% on the champion: a canary is routed at the first step, a fault is
  injected on it (NaN outputs, 50% errors, +150 ms latency), and the real bake trigger
  (``dayloop.airflow.triggers.BakeTrigger.run``, the code the triggerer runs) looks every
  analysis interval until it fails the step; then the rollback the DAG's rollback task runs
  (``controller.rollback_canary``). Measured until every router replica serves the
  champion's table.
* manual request -> 100% on the target: ``manual.execute_rollback`` (what the manual
  rollback DAG's task runs), alternating between two versions, until every replica serves it.

Baseline in the same run: one route-table write until every replica serves it (the floor any
rollback pays). Not included here: Airflow's own scheduling between tasks (the trigger event
resuming the operator, the rollback task being queued, a manual run being started). The
scenario tests under ``airflow standalone`` (tests/e2e/test_rollout_e2e.py) print the
end-to-end figures including it.

Usage: python benchmarks/bench_rollout_timing.py [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

FAULTS = {"nan": {"nan_rate": 1.0}, "errors": {"error_rate": 0.5}, "latency": {"latency_ms": 150}}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _all_applied(client, revision: int) -> bool:
    applied = client.router.applied_revisions()
    return bool(applied) and all(r >= revision for r in applied.values())


def _wait_table(client, predicate, timeout_s: float = 120.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        cur = client.router.routes()
        if cur is not None and predicate(cur) and _all_applied(client, cur.revision):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError("route table never reached the expected state")


async def _run_trigger(trigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise RuntimeError("trigger ended without an event")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per fault kind")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    os.environ["DAYLOOP_HOME"] = str(tmp / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from dayloop.airflow.triggers import BakeTrigger
    from dayloop.config import load_settings
    from dayloop.registry import CHAMPION, TAG_INDEX_PREFIX, Registry
    from dayloop.rollout import controller, manual
    from dayloop.rollout.pairs import serve_only
    from dayloop.simulation.panel import write_panel
    from serving.client import DataPlaneClient
    from serving.launch import DataPlane, PlaneConfig
    from serving.routing import single_version_table
    from serving_helpers import free_port, make_bundle, make_index, serving_python

    settings = load_settings()
    reg = Registry(settings)
    bundle = make_bundle(tmp / "bundle", seed=1)
    index = make_index(bundle, tmp / "index")
    fingerprint = json.loads((index / "index_meta.json").read_text())["fingerprint"]

    def register(n: int) -> int:
        ref = reg.register_bundle(f"2026-05-{n:02d}", bundle, {"seed": 0}, {"final_loss": 1.0},
                                  {"dayloop.logical_date": f"2026-05-{n:02d}"})
        reg.set_tags(ref.version, {"gate.offline.decision": "pass", f"{TAG_INDEX_PREFIX}status": "ready",
                                   f"{TAG_INDEX_PREFIX}uri": str(index), f"{TAG_INDEX_PREFIX}fingerprint": fingerprint,
                                   "dayloop.promotion": "bootstrap"})
        return int(ref.version)

    users = (np.arange(1, 201) * 7).astype(np.int64)
    panel = write_panel(tmp / "panel.npz", users, [np.arange(1001, 1011)] * users.size, {"source": "bench"})
    cfg = PlaneConfig(home=tmp / "plane", python=serving_python(), triton_http=free_port(),
                      triton_grpc=free_port(), triton_metrics=free_port(), index_port=free_port(),
                      router_ports=(free_port(), free_port()), prometheus_port=free_port(), faults_enabled=True)
    plane = DataPlane(cfg)
    results: dict[str, list[float]] = {}
    detect: dict[str, list[float]] = {}
    try:
        say("starting the data plane ...")
        plane.start()
        os.environ["DAYLOOP_PLANE_FILE"] = str(plane.write_plane_file())
        client = DataPlaneClient.from_plane_file(os.environ["DAYLOOP_PLANE_FILE"])
        champion = register(1)
        reg.set_alias(CHAMPION, champion)
        serve_only(settings, client, champion, actor="bench", reason="bench champion")
        stats = cfg.home / "sim.json"
        plane.start_simulator(panel, rate=20, stats_file=stats)
        time.sleep(3)

        # Baseline: one route write until every replica serves it.
        floor = []
        for i in range(5):
            cur = client.router.routes()
            t0 = time.monotonic()
            rev = client.router.write_routes(single_version_table(champion, f"bench-{i}"), cur.revision,
                                             "bench", "baseline write")
            floor.append(_wait_table(client, lambda c, r=rev.revision: c.revision >= r) - t0)
        results["route write -> all replicas (baseline)"] = floor

        n = 2
        params = {"rollout_profile": "demo"}
        for kind, fault in FAULTS.items():
            for _ in range(args.reps):
                version = register(n)
                n += 1
                ctx = controller.deploy_canary(settings, {"version": version, "alias": "challenger"}, params, "bench")
                client.router.set_fault(version, **fault)
                onset = time.monotonic()
                event = asyncio.run(_run_trigger(BakeTrigger(ctx.to_dict(), 0, ctx.started_at, None)))
                decided = time.monotonic()
                assert event["decision"] == "fail", event
                controller.fail_step(settings, ctx, {"index": 0, "percent": ctx.plan.steps[0].percent,
                                                     **event})
                controller.rollback_canary(settings, {"version": version}, ctx, "bench")
                done = _wait_table(client, lambda c: c.table.as_dict()["routes"] == [
                    {"start": 0, "end": 10000, "version": champion}])
                client.router.clear_faults()
                results.setdefault(f"{kind}: fault onset -> 100% champion", []).append(done - onset)
                detect.setdefault(kind, []).append(decided - onset)
                say(f"  {kind}: decided after {decided - onset:.1f} s ({len(event['looks'])} looks), "
                    f"100% champion after {done - onset:.1f} s; {event['result']['reasons'][0][:100]}")

        # Manual rollback: alternate between the champion and another once-champion version.
        other = register(n)
        for i in range(2 * args.reps):
            target = other if i % 2 == 0 else champion
            t0 = time.monotonic()
            manual.execute_rollback(settings, client, model=None, target=str(target), reason="bench manual rollback",
                                    actor="bench")
            done = _wait_table(client, lambda c, t=target: c.table.as_dict()["routes"] == [
                {"start": 0, "end": 10000, "version": t}])
            results.setdefault("manual request -> 100% target", []).append(done - t0)
        failed = json.loads(stats.read_text())["failed"]
    finally:
        plane.stop()

    say()
    say(f"{'measurement':<44} {'n':>3} {'median s':>9} {'max s':>7} {'x baseline':>11}")
    base = statistics.median(results["route write -> all replicas (baseline)"])
    for name, values in results.items():
        med = statistics.median(values)
        say(f"{name:<44} {len(values):>3} {med:>9.2f} {max(values):>7.2f} {med / base:>11.1f}")
    for kind, values in detect.items():
        say(f"  {kind}: analysis decided after median {statistics.median(values):.1f} s "
            f"(demo plan: a look every 5 s, 3 s drain)")
    say(f"user requests failed during all of it: {sum(failed.values())} ({failed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
