"""Shared fixtures: every test gets its own Dayloop home and never sees a demo stack."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Airflow reads its configuration once, at first import: give the whole session a
# throw-away AIRFLOW_HOME before any test imports it.
_SESSION_AIRFLOW_HOME = tempfile.mkdtemp(prefix="dayloop-test-airflow-")
os.environ["AIRFLOW_HOME"] = _SESSION_AIRFLOW_HOME
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    for name in ("MLFLOW_TRACKING_URI", "DAYLOOP_PLANT_FAULTS", "DAYLOOP_REPLAY_START"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAYLOOP_HOME", str(tmp_path_factory.mktemp("dayloop-home")))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
