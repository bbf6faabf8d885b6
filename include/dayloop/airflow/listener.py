"""An Airflow listener that keeps the route table honest when a daily run dies from outside.

The rollback task covers every failure inside a run. A run ended from outside never reaches
it: Airflow's ``dagrun_timeout``, or a person marking the run failed in the UI while its
canary bakes. Either way Airflow fires ``on_dag_run_failed``, in the scheduler or in the API
server. This hook then hands the run to
:func:`dayloop.rollout.controller.clear_orphaned_rollout`. That puts the champion back only
when the run itself made the route table's last write and a version other than the champion
is still routed, then alerts like the rollback task does. Runs that rolled back by
themselves, runs a manual rollback overtook, and runs of other DAGs are left alone.

The work runs in a daemon thread, so it never holds up the scheduler loop or the UI's
request.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger("dayloop.listener")
DAG_ID = "daily_refresh"


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    if getattr(dag_run, "dag_id", None) != DAG_ID:
        return
    run_id = str(dag_run.run_id)
    threading.Thread(target=clear_after_failed_run, args=(run_id, msg or "failed"),
                     name=f"dayloop-clear-{run_id}", daemon=True).start()


def clear_after_failed_run(run_id: str, why: str, settings: Any = None) -> dict[str, Any] | None:
    """Clear what a failed daily run left routed (see the module doc) and alert on it.
    ``settings`` defaults to this process's (the Airflow component's environment)."""
    from dayloop.airflow.notifier import send_alert, webhook_url

    base = {"dag_id": DAG_ID, "run_id": run_id, "task_id": None}
    try:
        from dayloop.config import load_settings
        from dayloop.rollout import controller

        out = controller.clear_orphaned_rollout(settings or load_settings(), f"{DAG_ID}/{run_id}", why)
    except Exception as exc:  # noqa: BLE001 - a listener must never raise into Airflow
        log.exception("could not check or clear the route table after run %s failed", run_id)
        send_alert({**base, "kind": "rollback_failed",
                    "text": f"ROLLBACK FAILED after {DAG_ID} run {run_id} ended ({why}): {exc}; check the "
                            "route table and roll back by hand (manual_rollback DAG)"}, webhook_url())
        return None
    if not out.get("cleared"):
        log.info("run %s failed (%s); route table left alone: %s", run_id, why, out.get("why"))
        return out
    text = (f"Dayloop rolled back v{out['version']} to champion v{out['champion']} (route revision "
            f"{out['revision']}): {out['reason']}")
    send_alert({**base, "kind": "rollback", "version": out["version"], "champion": out["champion"],
                "revision": out["revision"], "reason": out["reason"], "text": text}, webhook_url())
    return out
