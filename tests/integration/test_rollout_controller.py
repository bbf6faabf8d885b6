"""The rollout controller (what the daily DAG's rollout tasks call) against the real data
plane, a real Prometheus and a real MLflow registry, with simulated users running:
a healthy canary is promoted through every step, a NaN-emitting canary is rolled back at
its first step, a manual rollback during a ramp wins and the rollout stops without fighting
it, bad rollback requests change nothing, and a canary left routed by a run that died
without its rollback task is cleared by the run listener or by a manual rollback to the
champion. The DAG wiring itself (operator, trigger in
the triggerer, trigger rules) is covered under the real scheduler in tests/e2e."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest

from dayloop.config import load_settings
from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, TAG_INDEX_PREFIX, Registry
from dayloop.rollout import bake, controller, manual
from dayloop.rollout.context import RolloutContext
from dayloop.rollout.deploy import RolloutAborted
from dayloop.simulation.panel import write_panel
from serving.client import DataPlaneClient
from serving.launch import DataPlane, PlaneConfig
from serving_helpers import free_port, make_bundle, make_index, serving_python, top_items

pytestmark = pytest.mark.integration

USERS = (np.arange(1, 201) * 7).astype(np.int64)  # the test bundles' user ids
FAST = {"rollout_profile": "demo",
        "rollout_overrides": {"bake_seconds": 6, "max_bake_seconds": 45, "min_requests": 15, "min_impressions": 15}}


def _register(reg: Registry, ds: str, bundle, index_dir) -> int:
    ref = reg.register_bundle(ds, bundle, {"seed": 0}, {"final_loss": 1.0}, {"dayloop.logical_date": ds})
    meta = json.loads((index_dir / "index_meta.json").read_text())
    reg.set_tags(ref.version, {"gate.offline.decision": "pass", f"{TAG_INDEX_PREFIX}status": "ready",
                               f"{TAG_INDEX_PREFIX}uri": str(index_dir),
                               f"{TAG_INDEX_PREFIX}fingerprint": meta["fingerprint"]})
    return int(ref.version)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("dayloop-home")
    saved = {k: os.environ.get(k) for k in ("DAYLOOP_HOME", "MLFLOW_TRACKING_URI", "DAYLOOP_PLANE_FILE")}
    os.environ["DAYLOOP_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    settings = load_settings()
    art = tmp_path_factory.mktemp("art")
    reg = Registry(settings)
    # Six versions of one model (same seed): any of them is as good as another online, so a
    # canary fails only by what the test does to it.
    bundle = make_bundle(art / "b", seed=1)
    index = make_index(bundle, art / "i")
    v = [_register(reg, f"2026-04-0{i + 1}", bundle, index) for i in range(6)]
    reg.set_alias(CHAMPION, v[0])
    reg.set_tags(v[0], {"dayloop.promotion": "bootstrap"})
    # Users like what this model ranks top-10 for them, so every arm earns clicks.
    panel = write_panel(art / "panel.npz", USERS, list(top_items(bundle, USERS, 10)), {"source": "test"})
    cfg = PlaneConfig(home=tmp_path_factory.mktemp("plane"), python=serving_python(),
                      triton_http=free_port(), triton_grpc=free_port(), triton_metrics=free_port(),
                      index_port=free_port(), router_ports=(free_port(), free_port()),
                      prometheus_port=free_port(), faults_enabled=True)
    plane = DataPlane(cfg)
    try:
        plane.start()
        os.environ["DAYLOOP_PLANE_FILE"] = str(plane.write_plane_file())
        client = DataPlaneClient.from_plane_file(os.environ["DAYLOOP_PLANE_FILE"])
        from dayloop.rollout.pairs import serve_only

        serve_only(settings, client, v[0], actor="test", reason="bootstrap champion")
        stats = cfg.home / "sim.json"
        plane.start_simulator(panel, rate=40, stats_file=stats)
        yield {"settings": settings, "reg": reg, "client": client, "plane": plane, "stats": stats, "v": v}
    finally:
        plane.stop()
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def _bake(ctx: RolloutContext, index: int, started_at: str, state=None) -> dict:
    """What the bake trigger does: look every interval until the step is decided."""
    interval = ctx.plan.analysis_interval_seconds
    t0 = bake.parse_time(started_at)
    k = 1
    while True:
        due = t0.timestamp() + k * interval
        time.sleep(max(0.0, due - time.time()))
        k += 1
        result = bake.look(ctx, index, started_at, state)
        state = result["ctr_state"]
        if result["decision"] != bake.CONTINUE:
            return result


def _record(ctx, index, result):
    return {"index": index, "percent": ctx.plan.steps[index].percent, "decision": result["decision"],
            "started_at": "", "ended_at": result["at"], "result": result, "looks": []}


def _failed(world) -> dict:
    return json.loads(world["stats"].read_text())["failed"]


def test_a_healthy_canary_is_promoted_through_every_step(world):
    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    # The champion-only period is the CTR test's baseline: let the users fill it first.
    time.sleep(20.0)
    before = client.router.routes()
    ctx = controller.deploy_canary(s, {"version": v[1], "alias": "challenger"}, FAST, "test")
    assert ctx.mode == "canary" and ctx.champion == v[0]
    assert int(reg.alias_version(CHALLENGER).version) == v[1]
    # The canary kept the champion-only table's salt: its groups' pre-period is the baseline.
    assert ctx.salt == before.table.salt and ctx.baseline_start == before.created_at
    started, state, steps = ctx.started_at, None, []
    for i, step in enumerate(ctx.plan.steps):
        result = _bake(ctx, i, started, state)
        assert result["decision"] == "pass", bake.summary_line(result)
        checks = {c["name"]: c["phase"] for c in result["analysis"]["checks"]}
        deciding = {c["name"]: c["phase"] for c in result["analysis"]["checks"] if not c["advisory"]}
        assert set(deciding.values()) == {"pass"}, checks
        if step.percent < 100:
            assert {"ctr", "score_drift", "latency_p99_vs_control"} <= set(checks)
            assert [c["name"] for c in result["analysis"]["checks"] if c["advisory"]] == ["score_drift"]
            ctr = next(c["values"] for c in result["analysis"]["checks"] if c["name"] == "ctr")
            # judged at the randomisation unit, with the pre-period baseline
            assert ctr["unit"] == "bucket group" and 0 < ctr["canary_groups"] <= round(step.percent)
            assert ctr["adjusted_ratio"] > 0 and ctr["upper_bound"] > ctr["adjusted_ratio"]
        controller.record_step(s, ctx, _record(ctx, i, result))
        steps.append(result)
        state = result["ctr_state"]
        if i + 1 < len(ctx.plan.steps):
            started = controller.route_next_step(s, ctx, i + 1)
            shares = client.router.routes().table.as_dict()
            assert shares["salt"] == ctx.salt
    promoted = controller.promote_canary(s, ctx, {"outcome": "passed"}, "test")
    assert promoted["promoted"] and promoted["previous"] == v[0]
    assert client.router.routes().table.as_dict()["routes"] == [{"start": 0, "end": 10000, "version": v[1]}]
    assert int(reg.alias_version(CHAMPION).version) == v[1]
    assert int(reg.alias_version(PREVIOUS).version) == v[0]
    assert reg.alias_version(CHALLENGER) is None
    tags = dict(reg.get_version(v[1]).tags)
    assert tags["dayloop.rollout.status"] == "promoted"
    assert all(tags[f"dayloop.rollout.step{i}"].startswith("pass") for i in range(3))
    assert all("adjusted ratio" in tags[f"dayloop.rollout.step{i}.ctr"] for i in range(2))
    retired = controller.retire_previous(s, ctx, promoted)
    assert retired["retired"] == v[0] and v[0] not in client.triton.ready_versions()
    assert sum(_failed(world).values()) == 0, _failed(world)


def test_the_routers_export_impressions_and_clicks_per_bucket_group_and_version(world):
    from datetime import datetime, timedelta, timezone

    from dayloop.rollout.prom import connect, read_groups, read_window
    from serving.routing import N_GROUPS

    client, v = world["client"], world["v"]
    champion = client.router.routes().table.stable
    prom = client.endpoints["prometheus_url"]
    time.sleep(4.0)
    end = datetime.now(timezone.utc) - timedelta(seconds=1.5)
    start = end - timedelta(seconds=20)
    groups = read_groups(prom, [champion], start, end, n_groups=N_GROUPS)
    totals = read_window(prom, [champion], start, end)[champion]
    # every group has its series (created at 0 when the table applied), and they add up
    assert all(math.isfinite(x) for x in groups.impressions) and all(math.isfinite(x) for x in groups.clicks)
    # The raw counters add up exactly in one scrape (the router bumps a group's counter with
    # its version's); read them at one instant, a scrape interval behind.
    with connect(prom) as c:
        at = datetime.now(timezone.utc)
        raw = {m: float(c.custom_query(f'sum(dayloop_router_{m}_total{{version="{champion}"}})',
                                       params={"time": f"{at.timestamp():.3f}"})[0]["value"][1])
               for m in ("impressions", "group_impressions", "clicks", "group_clicks")}
    assert raw["impressions"] > 0
    assert raw["group_impressions"] == pytest.approx(raw["impressions"], rel=0.002, abs=2)
    assert raw["group_clicks"] == pytest.approx(raw["clicks"], rel=0.01, abs=2)
    # Over a window each series' increase() is extrapolated on its own; a group carries a
    # hundredth of the traffic, so the sum of 100 extrapolations only roughly meets the total.
    assert sum(groups.impressions) == pytest.approx(totals.impressions, rel=0.08)
    assert sum(groups.clicks) == pytest.approx(totals.clicks, rel=0.15, abs=3)
    assert sum(x > 0 for x in groups.impressions) > N_GROUPS // 2
    # a version no table has routed yet has no group series: missing, not zero
    other = v[-1]
    assert all(math.isnan(x) for x in read_groups(prom, [other], start, end, n_groups=N_GROUPS).impressions)


def test_a_canary_emitting_nan_is_cut_off_by_the_breakers_and_rolled_back_at_its_first_step(world):
    """What the bake trigger does between looks: read the routers' breakers, and on a trip of
    the canary cut it off with one route write; the rollback task then only drains, unloads
    and tags. A look of the same step reads the trip too and fails citing it."""
    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    champion = int(reg.alias_version(CHAMPION).version)
    ctx = controller.deploy_canary(s, {"version": v[2], "alias": "challenger"}, FAST, "test")
    client.router.set_fault(v[2], nan_rate=1.0)
    try:
        t0 = time.monotonic()
        trips = []
        while not trips and time.monotonic() - t0 < 30:
            time.sleep(0.25)
            trips = bake.watch_breakers(ctx, ctx.started_at)
        tripped_s = time.monotonic() - t0
        looked = bake.look(ctx, 0, ctx.started_at, None)
        result = bake.cut_off(ctx, 0, ctx.started_at, trips)
        cut_s = time.monotonic() - t0
        reason = controller.fail_step(s, ctx, _record(ctx, 0, result))
        out = controller.rollback_canary(s, {"version": v[2]}, ctx, "test")
    finally:
        client.router.clear_faults()
    print(f"NaN canary: fault -> breaker trip seen {tripped_s:.2f} s, -> 100% champion in the table {cut_s:.2f} s")
    assert trips and all("circuit breaker opened on v%d" % v[2] in t and "nonfinite 3" in t for t in trips)
    assert looked["decision"] == "fail" and any("circuit breaker" in r for r in looked["reasons"])
    assert result["decision"] == "fail" and any("cut off: 100% to champion" in r for r in result["reasons"])
    current = client.router.routes()
    assert current.table.as_dict()["routes"] == [{"start": 0, "end": 10000, "version": champion}]
    assert current.actor == f"rollout/v{v[2]}/breaker" and "circuit-breaker cut-off" in current.reason
    assert out["rolled_back"] and not out["routed"], "the cut-off had already routed the champion"
    assert "circuit breaker" in reason and "nonfinite" in reason
    tags = dict(reg.get_version(v[2]).tags)
    assert tags["dayloop.rollout.status"] == "rolled_back" and "nonfinite" in tags["dayloop.rollout.reason"]
    assert reg.alias_version(CHALLENGER) is None and int(reg.alias_version(CHAMPION).version) == champion
    assert v[2] not in client.triton.ready_versions()
    with pytest.raises(controller.RolloutNotAllowed, match="already rolled out"):
        controller.deploy_canary(s, {"version": v[2], "alias": "challenger"}, FAST, "test")
    assert sum(_failed(world).values()) == 0, _failed(world)


def test_a_manual_rollback_to_the_champion_repairs_a_champion_that_does_not_truly_serve(world):
    """The table routes 100% to the champion, but its index was unloaded behind everyone's
    back: the routers answer from the fallback chain. A manual rollback to ``champion`` probes
    what serves, reloads the pair and says so; asked again, it verifies and changes nothing."""
    s, reg, client = world["settings"], world["reg"], world["client"]
    champion = int(reg.alias_version(CHAMPION).version)
    assert client.router.probe(champion)["serving"]
    client.index.unload_index(champion)
    before = client.router.routes()
    probe = client.router.probe(champion)
    assert not probe["serving"] and any("index not loaded" in p for p in probe["problems"]), probe
    out = manual.execute_rollback(s, client, model=None, target="champion", reason="users get fallback lists",
                                  actor="carol")
    assert out["changed"] and out["repaired"] and out["verified"], out
    assert any("index not loaded" in p for p in out["repaired"])
    assert client.router.probe(champion)["serving"]
    assert client.router.routes().revision == before.revision, "the table was right: not rewritten"
    assert "index not loaded" in dict(reg.get_version(champion).tags)["dayloop.manual_rollback.repaired"]
    again = manual.execute_rollback(s, client, model=None, target="champion", reason="check it again",
                                    actor="carol")
    assert not again["changed"] and again["verified"]
    time.sleep(1.0)
    assert sum(_failed(world).values()) == 0, _failed(world)


def test_bad_manual_rollback_requests_change_nothing(world):
    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    before = (client.router.routes().revision, reg.alias_version(CHAMPION).version,
              reg.alias_version(PREVIOUS).version)
    bad = [dict(model="other_model", target="previous", reason="valid reason"),
           dict(model=None, target="previous", reason="no"),
           dict(model=None, target="999", reason="unknown version"),
           dict(model=None, target="v1", reason="not a version"),
           dict(model=None, target=str(v[2]), reason="rolled back, never champion"),
           dict(model=None, target=str(v[3]), reason="never deployed at all")]
    for req in bad:
        with pytest.raises(manual.RollbackRefused):
            manual.execute_rollback(s, client, actor="test", **req)
    after = (client.router.routes().revision, reg.alias_version(CHAMPION).version,
             reg.alias_version(PREVIOUS).version)
    assert after == before
    dry = manual.execute_rollback(s, client, model=None, target="previous", reason="dry run check", actor="t",
                                  dry_run=True)
    assert dry["dry_run"] and not dry["changed"] and dry["target"] == int(before[2])
    assert client.router.routes().revision == before[0]


def test_a_manual_rollback_during_a_ramp_wins_and_the_rollout_stops(world):
    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    champion = int(reg.alias_version(CHAMPION).version)
    previous = int(reg.alias_version(PREVIOUS).version)
    ctx = controller.deploy_canary(s, {"version": v[3], "alias": "challenger"}, FAST, "test")
    with pytest.raises(controller.RolloutInFlight):
        controller.deploy_canary(s, {"version": v[2], "alias": "challenger"}, FAST, "test")
    t0 = time.monotonic()
    out = manual.execute_rollback(s, client, model=None, target="previous", reason="bad numbers on v-next",
                                  actor="alice")
    elapsed = time.monotonic() - t0
    assert out["changed"] and out["target"] == previous and out["canary_in_flight"] == v[3]
    assert elapsed < 60
    table = client.router.routes()
    assert table.table.as_dict()["routes"] == [{"start": 0, "end": 10000, "version": previous}]
    assert table.actor == "manual_rollback/alice" and "bad numbers" in table.reason
    # The rollout sees the foreign table at its next look, and cannot write over it.
    result = bake.look(ctx, 0, ctx.started_at, None)
    assert result["decision"] == "aborted" and "manual_rollback/alice" in result["reasons"][0]
    with pytest.raises(RolloutAborted):
        controller.route_next_step(s, ctx, 1)
    controller.fail_step(s, ctx, _record(ctx, 0, result))
    rb = controller.rollback_canary(s, {"version": v[3]}, ctx, "test")
    assert rb["rolled_back"] and not rb["routed"]
    assert client.router.routes().revision == table.revision
    with pytest.raises(controller.RolloutFailed, match="aborted"):
        controller.report_rollout(s, {"version": v[3]}, ctx, [_record(ctx, 0, result)], None, rb,
                                  world["plane"].cfg.home / "report")
    assert int(reg.alias_version(CHAMPION).version) == previous
    assert int(reg.alias_version(PREVIOUS).version) == champion
    assert reg.alias_version(CHALLENGER) is None
    tags = dict(reg.get_version(previous).tags)
    assert tags["dayloop.manual_rollback.actor"] == "alice"
    assert tags["dayloop.manual_rollback.reason"] == "bad numbers on v-next"
    assert dict(reg.get_version(v[3]).tags)["dayloop.rollout.status"] == "aborted"
    assert v[3] not in client.triton.ready_versions()
    time.sleep(1.0)
    assert sum(_failed(world).values()) == 0, _failed(world)


def test_a_canary_orphaned_by_a_dead_run_is_cleared_by_a_manual_rollback_to_the_champion(world):
    """A run killed outside its own tasks (marked failed in the UI, dagrun_timeout) never runs
    its rollback task: its canary keeps its share. The next deploy refuses to start over it,
    and the runbook's answer (manual_rollback, target ``champion``) puts the champion back
    without moving any alias."""
    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    champion = int(reg.alias_version(CHAMPION).version)
    previous = int(reg.alias_version(PREVIOUS).version)
    controller.deploy_canary(s, {"version": v[4], "alias": "challenger"}, FAST, "test")  # ...and the run dies
    from serving.launch import describe_routes

    line = describe_routes(world["plane"].cfg.home / "plane.json")
    assert f"v{champion} 90%" in line and f"v{v[4]} 10%" in line and "two versions routed" in line, line
    with pytest.raises(controller.RolloutInFlight, match="another rollout holds the route table"):
        controller.deploy_canary(s, {"version": v[4], "alias": "challenger"}, FAST, "test")
    out = manual.execute_rollback(s, client, model=None, target="champion", reason="orphaned canary after a killed run",
                                  actor="bob")
    assert out["changed"] and out["target"] == champion and out["canary_in_flight"] == v[4]
    table = client.router.routes()
    assert table.table.as_dict()["routes"] == [{"start": 0, "end": 10000, "version": champion}]
    assert table.actor == "manual_rollback/bob"
    assert int(reg.alias_version(CHAMPION).version) == champion
    assert int(reg.alias_version(PREVIOUS).version) == previous
    assert reg.alias_version(CHALLENGER) is None
    assert dict(reg.get_version(v[4]).tags)["dayloop.rollout.status"] == "aborted"
    assert v[4] not in client.triton.ready_versions()
    # Asked again, there is nothing left to do.
    again = manual.execute_rollback(s, client, model=None, target="champion", reason="orphaned canary after a killed run",
                                    actor="bob")
    assert not again["changed"] and client.router.routes().revision == table.revision
    time.sleep(1.0)
    assert sum(_failed(world).values()) == 0, _failed(world)


def test_the_run_listener_clears_only_the_canary_its_own_dead_run_left_routed(world):
    """What the Airflow listener does when a daily run ends failed (the listener's Airflow
    side, a real ``on_dag_run_failed``, is covered under the real scheduler in tests/e2e)."""
    from dayloop.airflow.listener import clear_after_failed_run

    s, reg, client, v = world["settings"], world["reg"], world["client"], world["v"]
    champion = int(reg.alias_version(CHAMPION).version)
    controller.deploy_canary(s, {"version": v[5], "alias": "challenger"}, FAST, "daily_refresh/run-dead")
    before = client.router.routes()
    # Another run's failure, or a run that never wrote the table: nothing is touched.
    for run_id in ("run-other", "run-dead-2"):
        out = clear_after_failed_run(run_id, "timed_out", s)
        assert not out["cleared"] and "last writer" in out["why"]
    assert client.router.routes().revision == before.revision
    out = clear_after_failed_run("run-dead", "timed_out", s)
    assert out["cleared"] and out["routed"] and out["version"] == v[5] and out["champion"] == champion, out
    table = client.router.routes()
    assert table.table.as_dict()["routes"] == [{"start": 0, "end": 10000, "version": champion}]
    assert table.actor == "daily_refresh/run-dead/listener"
    tags = dict(reg.get_version(v[5]).tags)
    assert tags["dayloop.rollout.status"] == "rolled_back" and "timed_out" in tags["dayloop.rollout.reason"]
    assert reg.alias_version(CHALLENGER) is None and int(reg.alias_version(CHAMPION).version) == champion
    assert v[5] not in client.triton.ready_versions()
    # Called again (the run's own rollback already ran, say): the champion alone is routed.
    again = clear_after_failed_run("run-dead", "task_failure", s)
    assert not again["cleared"] and client.router.routes().revision == table.revision
    time.sleep(1.0)
    assert sum(_failed(world).values()) == 0, _failed(world)
