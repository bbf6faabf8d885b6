"""Shared fixtures: every test gets its own Dayloop home and never sees a demo stack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    for name in ("MLFLOW_TRACKING_URI", "DAYLOOP_PLANT_FAULTS", "DAYLOOP_REPLAY_START"):
        monkeypatch.delenv(name, raising=False)
    if "DAYLOOP_HOME" not in os.environ:
        monkeypatch.setenv("DAYLOOP_HOME", str(tmp_path_factory.mktemp("dayloop-home")))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
