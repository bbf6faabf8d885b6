"""Rollout alerts through an Airflow notifier: a log line always, a webhook when configured.

Attached to the rollback task (``on_success_callback`` / ``on_failure_callback``): after a
rollback that undid something it sends "v7 rolled back to v6: <reason>"; if the rollback
task itself failed it sends the louder "ROLLBACK FAILED". The webhook is the Airflow
connection ``dayloop_alert_webhook`` (its host is the URL, e.g. a Slack or Alertmanager
webhook), so the endpoint and its secret live where Airflow keeps connections; with no
such connection the alert is the log line only. Sending never fails the task: an alert
that cannot be delivered is logged as such.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier

log = logging.getLogger("dayloop.alerts")
WEBHOOK_CONN_ID = "dayloop_alert_webhook"


def webhook_url(conn_id: str = WEBHOOK_CONN_ID) -> str | None:
    """The webhook URL from the Airflow connection, or None when it is not defined."""
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - not defined (or no connection backend): log-only alerts
        return None
    host = conn.host or ""
    if host.startswith(("http://", "https://")):
        return host
    if not host:
        return None
    scheme = conn.schema or "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}"


def send_alert(payload: dict[str, Any], url: str | None, timeout_s: float = 5.0) -> bool:
    """Log the alert; POST it as JSON to ``url`` if given. True when delivered (or log-only)."""
    log.warning("ALERT %s", payload.get("text"))
    if not url:
        return True
    import httpx  # here, not at the top: the DAG files import this module at parse time

    # Encoded here, not by httpx: its JSON encoder refuses NaN, and a payload that cannot be
    # encoded at all is a programming error that should raise, not an undelivered alert.
    body = json.dumps(payload).encode()
    try:
        # Redirects followed as urllib did; any other non-2xx answer is an undelivered alert.
        resp = httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                          timeout=timeout_s, follow_redirects=True)
    except Exception as exc:  # noqa: BLE001 - an undeliverable alert must not fail the rollback
        log.error("alert not delivered to the webhook: %s", exc)
        return False
    if not 200 <= resp.status_code < 300:
        log.error("alert not delivered to the webhook: HTTP %s", resp.status_code)
        return False
    return True


class RolloutAlertNotifier(BaseNotifier):
    """Alert on a rollback (success callback) or on a failed rollback (failure callback)."""

    def __init__(self, failed: bool = False, conn_id: str = WEBHOOK_CONN_ID) -> None:
        super().__init__()
        self.failed = failed
        self.conn_id = conn_id

    def notify(self, context: Any) -> None:
        ti = context.get("ti") or context.get("task_instance")
        run = context.get("dag_run")
        base = {"dag_id": getattr(ti, "dag_id", None), "run_id": getattr(run, "run_id", None),
                "task_id": getattr(ti, "task_id", None)}
        if self.failed:
            text = (f"ROLLBACK FAILED in {base['dag_id']} run {base['run_id']}: the canary may still be "
                    f"routed; check the route table and roll back by hand (manual_rollback DAG)")
            send_alert({**base, "kind": "rollback_failed", "text": text}, webhook_url(self.conn_id))
            return
        result = ti.xcom_pull(task_ids=ti.task_id) if ti is not None else None
        if not result or not result.get("rolled_back"):
            return  # nothing was undone: no alert
        text = (f"Dayloop rolled back v{result.get('version')} to champion v{result.get('champion')}"
                f" (route revision {result.get('revision')}): {result.get('reason')}")
        send_alert({**base, "kind": "rollback", "version": result.get("version"),
                    "champion": result.get("champion"), "revision": result.get("revision"),
                    "reason": result.get("reason"), "text": text}, webhook_url(self.conn_id))
