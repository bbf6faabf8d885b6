"""The environment of an Airflow subprocess started by a test: its own AIRFLOW_HOME, no
example DAGs, the project's dags/ folder."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def airflow_env(airflow_home: Path, **extra: str) -> dict[str, str]:
    """A copy of ``os.environ`` for Airflow at ``airflow_home``, then ``extra`` on top."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    })
    env.update(extra)
    return env
