"""Every DAG file imports cleanly, is well-formed, and parses without heavy imports,
network, connections or variables; parse time is measured in a fresh process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_env import airflow_env

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if p.name != "__init__.py")  # __init__: for the contracts
HEAVY = ("torch", "pyspark", "mlflow", "great_expectations", "faiss", "pandas", "numpy",
         "scipy", "sklearn", "matplotlib", "tritonclient")

# Runs in a fresh interpreter: blocks sockets, connection and variable look-ups, then
# parses one DAG file through a DagBag and reports what it loaded and how long it took.
PROBE = r"""
import json, socket, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
lookups = []
def refuse(*a, **k):
    lookups.append(repr(a)[:200])
    raise RuntimeError("network/connection/variable use at parse time")
socket.socket.connect = refuse
socket.create_connection = refuse
from airflow.sdk import BaseHook, Connection, Variable
BaseHook.get_connection = classmethod(refuse)
Connection.get = classmethod(refuse)
Variable.get = staticmethod(refuse)
before = set(sys.modules)
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({
    "seconds": seconds,
    "errors": {k: str(v)[:2000] for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "lookups": lookups,
    "new_modules": sorted({m.split(".")[0] for m in set(sys.modules) - before}),
}))
"""


def _airflow_env(tmp_path: Path) -> dict[str, str]:
    return airflow_env(tmp_path / "airflow", AIRFLOW__CORE__UNIT_TEST_MODE="False")


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("dagparse")
    out = {}
    for path in DAG_FILES:
        proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                              text=True, env=_airflow_env(tmp), timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[path.name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(scope="module")
def dags(probes, tmp_path_factory):
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def test_there_are_dag_files():
    assert [p.name for p in DAG_FILES], "no DAG files found under dags/"


@pytest.mark.parametrize("name", [p.name for p in DAG_FILES])
def test_parses_fresh_without_errors_network_or_heavy_imports(probes, name, record_property):
    probe = probes[name]
    record_property("parse_seconds", round(probe["seconds"], 3))
    print(f"{name}: parsed in {probe['seconds']:.3f}s in a fresh process")
    assert probe["errors"] == {}
    assert probe["dags"], f"{name} defines no DAG"
    assert probe["lookups"] == [], f"{name} used the network, a connection or a variable at parse time"
    heavy = sorted(set(probe["new_modules"]) & set(HEAVY))
    assert heavy == [], f"{name} imports heavy modules at parse time: {heavy}"


# Tasks that must not retry: a retry would repeat a decision already taken (a deploy that
# failed its live check, a bake that failed its analysis) or end the run twice; their
# failure path is the rollback task, which itself retries.
NO_RETRY = {
    "daily_refresh": {"rollout.deploy_canary", "rollout.bake_and_ramp", "rollout.report_rollout"},
    "manual_rollback": {"validate_request"},
}


def test_every_dag_is_well_formed(dags):
    assert dags
    for dag_id, dag in dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        assert not dag.catchup, f"{dag_id} must not catch up"
        for t in dag.tasks:
            assert t.owner and t.owner != "airflow", f"{dag_id}.{t.task_id} has no owner"
            if t.task_id in NO_RETRY.get(dag_id, ()):
                assert t.retries == 0, f"{dag_id}.{t.task_id} must not retry"
            else:
                assert t.retries >= 2, f"{dag_id}.{t.task_id} retries={t.retries}"
            assert t.doc_md or t.doc or getattr(t, "python_callable", None).__doc__, \
                f"{dag_id}.{t.task_id} has no docstring"


def test_daily_refresh_shape(dags):
    dag = dags["daily_refresh"]
    assert dag.max_active_runs == 1
    ids = set(dag.task_ids)
    expected = {"data_gate.land_partition", "data_gate.validate_partition", "build_features",
                "model.train_model", "model.register_model", "gate_model",
                "index.rebuild_index", "index.publish_candidate"}
    assert expected <= ids
    # Nothing trains before the data gate, nothing is indexed before the offline gate.
    assert "data_gate.validate_partition" in dag.get_task("build_features").upstream_task_ids
    assert "model.register_model" in dag.get_task("gate_model").upstream_task_ids
    assert "gate_model" in dag.get_task("index.rebuild_index").upstream_task_ids
    assert "index.rebuild_index" in dag.get_task("index.publish_candidate").upstream_task_ids
    # A bad rollout Param fails the run before any data is touched.
    assert "check_rollout_plan" in dag.get_task("data_gate.land_partition").upstream_task_ids


def test_daily_refresh_rollout_wiring(dags):
    """Deploy -> bake -> promote -> retire; rollback on any rollout failure; the report always
    runs and is the only leaf, so it alone decides the run's colour."""
    dag = dags["daily_refresh"]
    get = dag.get_task
    assert get("rollout.deploy_canary").upstream_task_ids == {"index.publish_candidate"}
    assert get("rollout.bake_and_ramp").upstream_task_ids == {"rollout.deploy_canary"}
    assert type(get("rollout.bake_and_ramp")).__name__ == "BakeAndRampOperator"
    assert {"rollout.deploy_canary", "rollout.bake_and_ramp"} <= get("rollout.promote_canary").upstream_task_ids
    assert get("rollout.retire_previous").upstream_task_ids >= {"rollout.promote_canary"}
    assert type(get("rollout.retire_previous")).__name__ == "RetirePreviousOperator"
    rollback = get("rollout.rollback_canary")
    assert rollback.trigger_rule == "one_failed"
    assert rollback.upstream_task_ids == {"rollout.deploy_canary", "rollout.bake_and_ramp",
                                          "rollout.promote_canary"}
    assert rollback.on_success_callback and rollback.on_failure_callback
    report = get("rollout.report_rollout")
    assert report.trigger_rule == "all_done"
    assert report.upstream_task_ids == {"rollout.retire_previous", "rollout.rollback_canary"}
    leaves = [t.task_id for t in dag.tasks if not t.downstream_task_ids]
    assert leaves == ["rollout.report_rollout"]


def test_the_profiles_are_what_the_dag_offers(dags):
    """The trigger form offers exactly the rollout profiles the plan knows (and empty)."""
    from dayloop.rollout.plan import PROFILES

    offered = dags["daily_refresh"].params.get_param("rollout_profile").schema["enum"]
    assert set(PROFILES) == {p for p in offered if p is not None}


def test_bad_params_are_refused(dags):
    from airflow.sdk.definitions.param import ParamsDict

    params = dags["daily_refresh"].params
    for bad in ({"train_epochs": 0}, {"train_epochs": "ten"}, {"index_recall_floor": 2.0},
                {"noninferiority_margin": -1}, {"rollout_profile": "fast"}, {"deploy": "yes"},
                {"rollout_overrides": "steps=5"}, {"rollout_overrides": [5, 100]}):
        merged = ParamsDict({k: v for k, v in params.items()})
        with pytest.raises(Exception):
            merged.update(bad)
            merged.validate()


def test_manual_rollback_form_refuses_bad_input(dags):
    dag = dags["manual_rollback"]
    assert dag.schedule is None or str(dag.timetable.summary).lower() in ("none", "null")
    good = {"reason": "p99 regression after v7"}
    # Deep copies: ParamsDict.update sets the value on the Param objects it was built from.
    merged = copy.deepcopy(dag.params)
    merged.update(good)
    merged.validate()
    for bad in ({}, {"reason": "bad"}, {**good, "target_version": "v7"}, {**good, "target_version": "0"},
                {**good, "target_version": "7; drop"}, {**good, "dry_run": "no"}, {**good, "force": 1}):
        merged = copy.deepcopy(dag.params)
        with pytest.raises(Exception):
            merged.update(bad)
            merged.validate()


LISTENER_PROBE = """
import json
from airflow.listeners.listener import get_listener_manager
from airflow import plugins_manager
lm = get_listener_manager()
impls = [getattr(impl.plugin, "__name__", "") for impl in lm.pm.hook.on_dag_run_failed.get_hookimpls()]
print(json.dumps({"impls": impls, "errors": plugins_manager.get_import_errors()}))
"""


def test_the_plugin_registers_the_run_listener_with_airflow(tmp_path):
    """Airflow itself (its plugin manager, from the plugins folder) finds the listener that
    clears a canary a dead daily run left routed."""
    env = {**_airflow_env(tmp_path), "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")}
    proc = subprocess.run([sys.executable, "-c", LISTENER_PROBE], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert "dayloop.airflow.listener" in out["impls"], out


def test_the_run_listener_ignores_other_dags(monkeypatch):
    import threading

    from dayloop.airflow import listener

    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))

    class Run:
        dag_id, run_id = "manual_rollback", "manual__x"

    listener.on_dag_run_failed(Run(), "task_failure")
    assert started == []
    Run.dag_id = "daily_refresh"
    listener.on_dag_run_failed(Run(), "timed_out")
    assert started == ["dayloop-clear-manual__x"]
