"""A small client for the Airflow 3 REST API (v2), used by the end-to-end tests and the demo
(``scripts/demo.py``) to drive DAGs the way a person does from the UI: unpause, trigger with
a logical date, watch the run. Waits are bounded.

It lives with the tests, not in the ``dayloop`` package: no DAG or task calls it, and the
runtime has no business talking to its own scheduler over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TERMINAL_RUN_STATES = {"success", "failed"}


class AirflowApiError(RuntimeError):
    """The API answered with an error or did not answer in time."""


def generated_password(airflow_home: Path, username: str = "admin") -> str:
    """The password ``airflow standalone`` generated for a simple-auth-manager user."""
    path = Path(airflow_home) / "simple_auth_manager_passwords.json.generated"
    try:
        return json.loads(path.read_text())[username]
    except (OSError, KeyError, ValueError) as exc:
        raise AirflowApiError(f"no generated password for {username!r} in {path}") from exc


@dataclass
class AirflowApi:
    base_url: str
    username: str
    password: str
    timeout: float = 30.0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        # Redirects followed, as the requests.Session this replaced did.
        self._session = httpx.Client(follow_redirects=True)
        self._token: str | None = None

    # ----- plumbing -------------------------------------------------------------
    def _login(self) -> None:
        resp = self._session.post(
            f"{self.base_url}/auth/token",
            json={"username": self.username, "password": self.password},
            timeout=self.timeout,
        )
        if resp.status_code not in (200, 201):
            raise AirflowApiError(f"login as {self.username!r} failed: {resp.status_code} {resp.text[:200]}")
        self._token = resp.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            self._login()
        for attempt in (1, 2):
            resp = self._session.request(
                method, f"{self.base_url}/api/v2{path}",
                headers={"Authorization": f"Bearer {self._token}"}, timeout=self.timeout, **kwargs,
            )
            if resp.status_code == 401 and attempt == 1:  # token expired
                self._login()
                continue
            break
        if resp.status_code >= 400:
            raise AirflowApiError(f"{method} {path}: {resp.status_code} {resp.text[:500]}")
        return resp.json() if resp.content else None

    # ----- health ---------------------------------------------------------------
    def wait_healthy(self, timeout_s: float = 180.0) -> dict:
        """Wait until the scheduler, triggerer and DAG processor all report healthy."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5, follow_redirects=True)
                ok = resp.status_code < 400
                last = resp.json() if ok else resp.text
                if ok and all(
                    (last.get(part) or {}).get("status") == "healthy"
                    for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                ):
                    return last
            except (httpx.HTTPError, ValueError) as exc:
                last = str(exc)
            time.sleep(2)
        raise AirflowApiError(f"Airflow not healthy after {timeout_s:.0f}s: {last}")

    # ----- DAGs and runs ----------------------------------------------------------
    def wait_dag(self, dag_id: str, timeout_s: float = 120.0) -> dict:
        """Wait until the DAG processor has parsed the DAG."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.request("GET", f"/dags/{dag_id}")
            except AirflowApiError:
                if time.monotonic() > deadline:
                    errors = self.request("GET", "/importErrors")
                    raise AirflowApiError(
                        f"DAG {dag_id} not parsed after {timeout_s:.0f}s; import errors: {errors}"
                    ) from None
                time.sleep(2)

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def trigger(self, dag_id: str, logical_day: dt.date | None = None, conf: dict | None = None,
                note: str | None = None) -> dict:
        """Trigger a run; with a logical day, its data interval is that whole UTC day."""
        body: dict[str, Any] = {"conf": conf or {}, "logical_date": None}
        if logical_day is not None:
            start = dt.datetime.combine(logical_day, dt.time(), tzinfo=dt.timezone.utc)
            body.update(
                logical_date=start.isoformat(),
                data_interval_start=start.isoformat(),
                data_interval_end=(start + dt.timedelta(days=1)).isoformat(),
            )
        if note:
            body["note"] = note
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def set_run_state(self, dag_id: str, run_id: str, state: str) -> dict:
        """What the UI's "Mark run as failed/success" does."""
        return self.request("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": state})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 1800.0, poll_s: float = 3.0,
                 on_change=None) -> dict:
        """Wait for a run to reach success or failed; ``on_change(ti_states)`` sees progress."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if on_change is not None:
                states = {ti["task_id"]: ti.get("state") or "none" for ti in self.task_instances(dag_id, run_id)}
                if states != seen:
                    on_change(states)
                    seen = states
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            time.sleep(poll_s)
        raise AirflowApiError(f"run {run_id} of {dag_id} not finished after {timeout_s:.0f}s")
