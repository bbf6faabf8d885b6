"""The daily DAG under the real scheduler (`airflow standalone`), not `dags test`:
the embedded stack is started by the same script `make demo` uses, on free ports and a
throw-away home, and stopped by its process groups at the end."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    var = tmp_path_factory.mktemp("e2e-var")
    today = dt.datetime.now(dt.timezone.utc).date()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "DAYLOOP"))}
    env.update({
        "DAYLOOP_VAR": str(var),
        "AIRFLOW_PORT": str(_free_port()),
        "MLFLOW_PORT": str(_free_port()),
        "DAYLOOP_SOURCE": "synthetic",
        "DAYLOOP_TRAIN_WINDOW_DAYS": "14",
        # Enough users that a paired per-user test can tell equal models apart.
        "DAYLOOP_SYNTH_USERS": "1500",
        "DAYLOOP_REPLAY_START": (today - dt.timedelta(days=1)).isoformat(),
        "AIRFLOW__CORE__PARALLELISM": "2",
    })
    proc = subprocess.run(["bash", str(STACK), "start"], env=env, capture_output=True, text=True, timeout=400)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield {"env": env, "var": var, "today": today}
    finally:
        subprocess.run(["bash", str(STACK), "stop"], env=env, capture_output=True, text=True, timeout=120)
        for name in ("airflow", "mlflow"):
            assert not (var / "run" / f"{name}.pgid").exists(), f"{name} still recorded as running"


def _api(stack):
    from dayloop.airflow.client import AirflowApi, generated_password

    env = stack["env"]
    password = generated_password(stack["var"] / "airflow")
    return AirflowApi(f"http://127.0.0.1:{env['AIRFLOW_PORT']}", "admin", password)


def _registry(stack, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{stack['env']['MLFLOW_PORT']}")
    monkeypatch.setenv("DAYLOOP_HOME", str(stack["var"] / "dayloop"))
    from dayloop.config import load_settings
    from dayloop.registry import Registry

    return Registry(load_settings())


def _failure_log(stack) -> str:
    """The error lines of every task log, so a failed assertion says why."""
    lines = []
    for path in sorted((stack["var"] / "airflow" / "logs").rglob("attempt=*.log")):
        errors = [l[:1500] for l in path.read_text(errors="replace").splitlines() if '"level":"error"' in l]
        if errors:
            lines.append(f"--- {path.relative_to(stack['var'])}")
            lines.extend(errors[-6:])
    return "\n".join(lines) or "no error lines in task logs"


def test_scheduled_run_then_triggered_run_under_the_real_scheduler(stack, monkeypatch):
    api = _api(stack)
    api.wait_healthy()
    api.wait_dag("daily_refresh")
    api.set_paused("daily_refresh", False)
    yesterday = stack["today"] - dt.timedelta(days=1)

    # catchup=False: unpausing makes the scheduler run the last closed day by itself.
    scheduled = None
    for _ in range(60):
        runs = [r for r in api.runs("daily_refresh") if (r.get("logical_date") or "")[:10] == yesterday.isoformat()]
        if runs:
            scheduled = runs[0]
            break
        import time
        time.sleep(2)
    assert scheduled is not None, "the scheduler created no run for the last closed day"
    assert scheduled["run_type"] == "scheduled"
    done = api.wait_run("daily_refresh", scheduled["dag_run_id"], timeout_s=900)
    assert done["state"] == "success", _failure_log(stack)

    # Margin for the small synthetic world (see tests/integration/test_daily_refresh_dagtest.py).
    triggered = api.trigger("daily_refresh", stack["today"], conf={"noninferiority_margin": 0.3}, note="e2e")
    done = api.wait_run("daily_refresh", triggered["dag_run_id"], timeout_s=900)
    assert done["state"] == "success", _failure_log(stack)
    states = {ti["task_id"]: ti["state"] for ti in api.task_instances("daily_refresh", triggered["dag_run_id"])}
    assert set(states.values()) == {"success"}, states

    reg = _registry(stack, monkeypatch)
    assert str(reg.alias_version("champion").version) == "1"
    assert str(reg.alias_version("challenger").version) == "2"
    tags = dict(reg.get_version(2).tags)
    assert tags["dayloop.logical_date"] == stack["today"].isoformat()
    assert tags["gate.offline.decision"] == "pass"
    assert tags["gate.offline.champion_version"] == "1"
    assert tags["dayloop.index.status"] == "ready"


def test_a_bad_param_is_refused_and_creates_no_run(stack):
    from dayloop.airflow.client import AirflowApiError

    api = _api(stack)
    before = len(api.runs("daily_refresh"))
    with pytest.raises(AirflowApiError) as err:
        api.trigger("daily_refresh", stack["today"] + dt.timedelta(days=1), conf={"train_epochs": -3})
    assert "400" in str(err.value) or "422" in str(err.value)
    assert len(api.runs("daily_refresh")) == before
