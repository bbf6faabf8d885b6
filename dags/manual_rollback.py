"""
### Manual rollback: put an earlier model version back on 100% of users

Trigger it from the Airflow UI (**Trigger DAG** form):

- **model**: the registered model (this deployment serves one);
- **target_version**: `previous` (default), `champion`, or a version number;
- **reason**: required; it goes into the route history and the version's tags;
- **dry_run**: validate and print what would change, change nothing;
- **force**: allow a version that was never champion (its index is still required).

`validate_request` checks everything first (the version exists, has its paired index, was
champion before); any bad input fails here with the reason and nothing is changed.
It is unpaused from its creation: a trigger (UI form or REST API) runs at once.
When the target already has 100% of users, `roll_back` checks that it truly serves (every
router replica embeds and searches a probe request with it); if not, it reloads the pair
and says so ("repaired"), otherwise "already serving". Else `roll_back` loads the pair if needed, routes 100% of users to it in one
compare-and-swap write that wins over any rollout in flight (the daily run's bake sees the
table taken over and stops without fighting), moves the `champion`/`previous` aliases, and
records who triggered it, when and why. Users keep being served throughout.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": pendulum.duration(seconds=5),
}


@dag(
    dag_id="manual_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # an emergency tool: runs the moment it is triggered, never waits for someone to unpause it
    is_paused_upon_creation=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    dagrun_timeout=pendulum.duration(minutes=30),
    tags=["dayloop", "serving", "rollback"],
    doc_md=__doc__,
    params={
        "model": Param("dayloop_two_tower", type="string", minLength=1, maxLength=200,
                       description="Registered model name."),
        "target_version": Param("previous", type="string", pattern=r"^(previous|champion|[1-9][0-9]{0,8})$",
                                description="'previous', 'champion' or a version number."),
        "reason": Param(type="string", minLength=5, maxLength=2000,
                        description="Why (required): recorded in the route history and version tags."),
        "dry_run": Param(False, type="boolean", description="Validate and show the plan; change nothing."),
        "force": Param(False, type="boolean",
                       description="Allow a version that was never champion (its index is still required)."),
    },
)
def manual_rollback():
    @task(retries=0)
    def validate_request(params=None) -> dict:
        """Check the request against the registry and the route table; change nothing."""
        from dayloop.airflow import tasks

        return tasks.validate_rollback_request(params)

    @task
    def roll_back(validated: dict, params=None, dag_run=None) -> dict:
        """Load the pair, route 100% to it, move the aliases, record who/when/why."""
        from dayloop.airflow import tasks

        return tasks.execute_manual_rollback(params, dag_run)

    roll_back(validate_request())


manual_rollback()
