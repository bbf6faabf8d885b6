"""Canary deploy, ramp, rollback and promotion against the real data plane and a real
MLflow registry, with simulated users running: the route table, the aliases and the tags
agree at the end of each path, and no user request fails."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from dayloop.config import load_settings
from dayloop.registry import CHALLENGER, CHAMPION, PREVIOUS, TAG_INDEX_PREFIX, Registry
from dayloop.rollout.deploy import DeployFailed, deploy_canary, promote, rollback, route_step
from dayloop.simulation.panel import write_panel
from serving.client import DataPlaneClient
from serving.launch import DataPlane, PlaneConfig
from serving_helpers import free_port, make_bundle, make_index, serving_python

pytestmark = pytest.mark.integration


def _register(reg: Registry, ds: str, bundle, index_dir, gate: str = "pass", index_ready: bool = True) -> str:
    ref = reg.register_bundle(ds, bundle, {"seed": 0}, {"final_loss": 1.0}, {"dayloop.logical_date": ds})
    meta = json.loads((index_dir / "index_meta.json").read_text())
    reg.set_tags(ref.version, {
        "gate.offline.decision": gate,
        f"{TAG_INDEX_PREFIX}status": "ready" if index_ready else "failed",
        f"{TAG_INDEX_PREFIX}uri": str(index_dir),
        f"{TAG_INDEX_PREFIX}fingerprint": meta["fingerprint"],
    })
    return ref.version


def _with_seen(index_dir, last_day: str, users: np.ndarray, n_seen: int):
    """Put a seen-items file beside the index and name it in the meta, as ``rebuild_index``
    does: each user has seen the first ``n_seen`` items (a later day, one more)."""
    from serving.fileio import file_sha256
    from serving.index_service.seen import SEEN_FILE, csr_from_pairs, write_seen_file

    items = np.arange(1001, 1001 + n_seen, dtype=np.int64)
    f = write_seen_file(index_dir / SEEN_FILE, *csr_from_pairs(np.repeat(users, n_seen), np.tile(items, users.size)),
                        last_day)
    meta = json.loads((index_dir / "index_meta.json").read_text())
    meta["seen_items"] = {"file": SEEN_FILE, "fingerprint": file_sha256(f), "last_day": last_day}
    (index_dir / "index_meta.json").write_text(json.dumps(meta))
    return index_dir


def _seen_day(client, version: int) -> str | None:
    return client.index.get_index(version)["seen_items"].get("last_day")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("dayloop-home")
    os.environ["DAYLOOP_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    settings = load_settings()
    art = tmp_path_factory.mktemp("art")
    reg = Registry(settings)
    versions = {}
    seen_users = (np.arange(1, 201) * 7).astype(np.int64)
    for i, ds in enumerate(("2026-03-01", "2026-03-02", "2026-03-03")):
        b = make_bundle(art / f"b{i}", seed=i)
        index_dir = _with_seen(make_index(b, art / f"i{i}"), ds, seen_users, 10 + i)
        versions[ds] = _register(reg, ds, b, index_dir, index_ready=(ds != "2026-03-03"))
    v1, v2, v_noindex = versions.values()
    reg.set_alias(CHAMPION, v1)
    users = (np.arange(1, 201) * 7).astype(np.int64)
    panel = write_panel(art / "panel.npz", users, [np.arange(1001, 1011)] * users.size, {"source": "test"})
    cfg = PlaneConfig(home=tmp_path_factory.mktemp("plane"), python=serving_python(),
                      triton_http=free_port(), triton_grpc=free_port(), triton_metrics=free_port(),
                      index_port=free_port(), router_ports=(free_port(), free_port()))
    plane = DataPlane(cfg)
    try:
        plane.start(prometheus=False)
        client = DataPlaneClient.from_plane_file(cfg.home / "plane.json")
        from dayloop.rollout.pairs import serve_only

        serve_only(settings, client, v1, actor="test", reason="bootstrap")
        stats = cfg.home / "sim.json"
        plane.start_simulator(panel, rate=25, stats_file=stats)
        yield {"settings": settings, "reg": reg, "client": client, "plane": plane, "stats": stats,
               "v1": int(v1), "v2": int(v2), "v_noindex": int(v_noindex)}
    finally:
        plane.stop()
        os.environ.pop("DAYLOOP_HOME", None)


def _table(w):
    return w["client"].router.routes().table.as_dict()


def test_deploy_ramp_rollback_then_deploy_promote_retire_with_users_running(world):
    s, reg, client, v1, v2 = world["settings"], world["reg"], world["client"], world["v1"], world["v2"]
    assert _seen_day(client, v1) == "2026-03-01"
    out = deploy_canary(s, client, v2, 10, actor="test")
    assert out["champion"] == v1 and out["live_check"]["finite"]
    # Both arms exclude the same history: the champion took the canary's fresher seen items.
    assert _seen_day(client, v1) == _seen_day(client, v2) == "2026-03-02"
    assert client.index.get_index(v1)["seen_items"]["fingerprint"] == \
        client.index.get_index(v2)["seen_items"]["fingerprint"]
    table = _table(world)
    assert table["stable"] == v1 and table["routes"][0] == {"start": 0, "end": 1000, "version": v2}
    assert int(reg.alias_version(CHALLENGER).version) == v2
    route_step(s, client, v2, v1, 50, out["salt"], actor="test")
    assert _table(world)["routes"][0] == {"start": 0, "end": 5000, "version": v2}
    time.sleep(1.5)

    rb = rollback(s, client, v2, reason="test: canary judged worse", actor="test", drain_seconds=1.0)
    assert _table(world)["routes"] == [{"start": 0, "end": 10000, "version": v1}]
    assert reg.alias_version(CHALLENGER) is None and int(reg.alias_version(CHAMPION).version) == v1
    tags = dict(reg.get_version(v2).tags)
    assert tags["dayloop.rollout.status"] == "rolled_back" and "judged worse" in tags["dayloop.rollout.reason"]
    assert v2 not in client.triton.ready_versions()
    assert _seen_day(client, v1) == "2026-03-02"  # history only grows: the champion keeps it
    hist = client.router.history(5)
    assert hist[0]["revision"] == rb["revision"] and "rollback of v" in hist[0]["reason"]

    out = deploy_canary(s, client, v2, 25, actor="test")
    time.sleep(1.0)
    pr = promote(s, client, v2, actor="test")
    assert _table(world) == {"salt": _table(world)["salt"], "stable": v2,
                             "routes": [{"start": 0, "end": 10000, "version": v2}]}
    assert int(reg.alias_version(CHAMPION).version) == v2
    assert int(reg.alias_version(PREVIOUS).version) == v1
    assert reg.alias_version(CHALLENGER) is None
    assert dict(reg.get_version(v2).tags)["dayloop.rollout.status"] == "promoted"
    assert pr["previous"] == v1
    time.sleep(1.0)
    client.unload_version(v1)
    assert client.triton.ready_versions() == [v2]
    time.sleep(1.0)
    stats = json.loads(world["stats"].read_text())
    assert stats["sent"] > 100
    assert sum(stats["failed"].values()) == 0, stats["failed"]


def test_a_version_without_its_index_is_not_deployed_and_nothing_changes(world):
    s, client = world["settings"], world["client"]
    before = client.router.routes()
    with pytest.raises(Exception, match="not deployable|no ready index"):
        deploy_canary(s, client, world["v_noindex"], 10, actor="test")
    after = client.router.routes()
    assert after.revision == before.revision and after.table == before.table


def test_deploying_the_champion_or_an_unknown_version_is_refused(world):
    s, client = world["settings"], world["client"]
    champion = int(world["reg"].alias_version(CHAMPION).version)
    before = client.router.routes().revision
    with pytest.raises(DeployFailed, match="already the champion"):
        deploy_canary(s, client, champion, 10, actor="test")
    with pytest.raises(DeployFailed, match="does not exist|not deployable|could not load"):
        deploy_canary(s, client, 999, 10, actor="test")
    assert client.router.routes().revision == before
