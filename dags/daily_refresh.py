"""
### Daily refresh of the two-tower recommender

Runs once per day, after the day closes, for the logical date `ds`:

1. **data_gate**: land the day's interaction partition, then validate it with Great
   Expectations (schema, nulls, ranges, timestamps inside the day) plus volume and drift
   against the trailing days. A failing partition goes to quarantine and the run stops here.
2. **features**: PySpark builds point-in-time training examples from the trailing window;
   the day itself is held out for evaluation.
3. **model**: train the two-tower model (PyTorch) and register it in MLflow with lineage
   tags; one version per logical date, however often the run is repeated.
4. **offline_gate**: challenger vs the `champion` alias on the held-out day (recall/NDCG,
   paired non-inferiority test, floors, popularity baseline, infra check, score PSI).
   Decision and reasons land on the version's tags and an HTML report in its run.
5. **index**: FAISS index of the item embeddings, recall-checked against exact search and
   linked to the version; then the version becomes `champion` (bootstrap, first model) or
   `challenger` (awaiting its canary).
6. **rollout**: on the live data plane (Triton + index service + routers, judged on
   Prometheus):
   - `deploy_canary`: load the model + index pair, check it live, route the plan's first
     step (the bootstrap champion gets 100% directly);
   - `bake_and_ramp`: each step bakes in the triggerer (deferrable; no worker slot held),
     then canary vs control is analysed (errors, NaN, p99, score drift, sequential CTR
     test); pass = next step, fail or too long inconclusive = stop;
   - `promote_canary` -> `retire_previous`: aliases `champion`/`previous` move, the old
     version is unloaded after a grace period (waited out in the triggerer);
   - `rollback_canary` runs when any rollout task failed: 100% back to the champion in one
     route write, canary drained and unloaded, reason tagged, alert sent;
   - `report_rollout` always runs: writes the rollout report to the version's MLflow run
     and fails the run unless the version ended up serving.

Params choose the rollout plan (`rollout_profile`, `rollout_overrides`) and whether to
deploy at all (`deploy`). Only one rollout holds the route table at a time; a manual
rollback (DAG `manual_rollback`) takes it over and this run stops without fighting it.

Every task is one call into `dayloop.airflow.tasks`; logic lives in `include/dayloop`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task, task_group

from dayloop.airflow.notifier import RolloutAlertNotifier
from dayloop.airflow.operators import BakeAndRampOperator, RetirePreviousOperator

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": pendulum.duration(seconds=30),
    "retry_exponential_backoff": True,
}


@dag(
    dag_id="daily_refresh",
    # The run for day D starts when D has closed: logical date = start of D.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    # Long enough for the prod plan at its worst (every step at max bake, ~15 h): a run
    # timed out mid-rollout would skip its rollback task.
    dagrun_timeout=pendulum.duration(hours=22),
    tags=["dayloop", "training", "daily"],
    doc_md=__doc__,
    params={
        "train_epochs": Param(None, type=["null", "integer"], minimum=1, maximum=50,
                              description="Override the number of training epochs."),
        "noninferiority_margin": Param(None, type=["null", "number"], minimum=0.0, maximum=0.5,
                                       description="Override the offline gate's non-inferiority margin."),
        "index_recall_floor": Param(0.95, type="number", minimum=0.5, maximum=1.0,
                                    description="Minimum recall@100 of the FAISS index vs exact search."),
        "deploy": Param(True, type="boolean",
                        description="Deploy the gated version on the serving tier (off: register and gate only)."),
        "rollout_profile": Param(None, type=["null", "string"], enum=[None, "prod", "demo"],
                                 description="Rollout plan profile (empty: the deployment's "
                                             "DAYLOOP_ROLLOUT_PROFILE, else prod)."),
        "rollout_overrides": Param(None, type=["null", "object"],
                                   description='Plan overrides, e.g. {"steps": [5, 50, 100], '
                                               '"bake_seconds": 60, "ctr_margin": 0.05}.'),
    },
)
def daily_refresh():  # noqa: C901 - ruff counts each nested task as a branch; the body is a plan
    @task
    def check_rollout_plan(params=None) -> dict:
        """Validate the rollout Params now, before a bad override wastes a training run."""
        from dayloop.airflow import tasks

        return tasks.check_rollout_plan(params)

    @task_group(group_id="data_gate")
    def data_gate(plan: dict):
        @task
        def land_partition(plan: dict, ds=None) -> dict:
            """Land the logical day's interaction partition (seeds history on the first run)."""
            from dayloop.airflow import tasks

            return tasks.land_partition(ds)

        @task
        def validate_partition(landed: dict, ds=None) -> dict:
            """Great Expectations suite + volume and drift checks; quarantine on failure."""
            from dayloop.airflow import tasks

            return tasks.validate_partition(ds)

        return validate_partition(land_partition(plan))

    @task
    def build_features(validated: dict, ds=None) -> dict:
        """Spark job: point-in-time training examples, user history, item features."""
        from dayloop.airflow import tasks

        return tasks.build_features(ds)

    @task_group(group_id="model")
    def model(features: dict):
        @task
        def train_model(features: dict, ds=None, params=None) -> dict:
            """Train the two-tower model and export the TorchScript user tower."""
            from dayloop.airflow import tasks

            return tasks.train_model(ds, features, params)

        @task
        def register_model(trained: dict, features: dict, ds=None, run_id=None) -> dict:
            """Log the run and register one model version for the logical date."""
            from dayloop.airflow import tasks

            return tasks.register_model(ds, trained, features, run_id)

        return register_model(train_model(features), features)

    @task
    def gate_model(registered: dict, features: dict, ds=None, params=None) -> dict:
        """Offline gate: challenger vs champion on the held-out day."""
        from dayloop.airflow import tasks

        return tasks.gate_model(ds, registered, features, params)

    @task_group(group_id="index")
    def index(gated: dict, features: dict):
        @task
        def rebuild_index(gated: dict, features: dict, ds=None, params=None) -> dict:
            """FAISS index of the item embeddings, recall-checked and linked to the version."""
            from dayloop.airflow import tasks

            return tasks.rebuild_index(ds, gated, features, params)

        @task
        def publish_candidate(indexed: dict, ds=None) -> dict:
            """First model: bootstrap champion; later: the challenger for the canary."""
            from dayloop.airflow import tasks

            return tasks.publish_candidate(ds, indexed)

        return publish_candidate(rebuild_index(gated, features))

    @task_group(group_id="rollout")
    def rollout(published: dict):
        @task(retries=0)
        def deploy_canary(published: dict, params=None, run_id=None) -> dict:
            """Load the pair, check it live, route the first step (or serve the bootstrap champion)."""
            from dayloop.airflow import tasks

            return tasks.deploy_canary(published, params, run_id)

        deployed = deploy_canary(published)
        baked = BakeAndRampOperator(
            task_id="bake_and_ramp", rollout=deployed, retries=0,
            doc_md="Each plan step bakes in the triggerer, then canary vs control is analysed on "
                   "Prometheus; pass routes the next step, fail stops the rollout.")

        @task
        def promote_canary(deployed: dict, baked: dict, run_id=None) -> dict:
            """Every step passed: 100% to the canary, champion/previous aliases moved."""
            from dayloop.airflow import tasks

            return tasks.promote_canary(deployed, baked, run_id)

        @task(trigger_rule="one_failed", retries=3, retry_delay=pendulum.duration(seconds=5),
              on_success_callback=RolloutAlertNotifier(), on_failure_callback=RolloutAlertNotifier(failed=True))
        def rollback_canary(ti=None, run_id=None) -> dict:
            """A rollout task failed: 100% back to the champion, canary drained and unloaded, alert."""
            from dayloop.airflow import tasks

            return tasks.rollback_canary(ti, run_id)

        @task(trigger_rule="all_done", retries=0)
        def report_rollout(ti=None, ds=None) -> dict:
            """Rollout report to MLflow; fails the run unless the version ended up serving."""
            from dayloop.airflow import tasks

            return tasks.report_rollout(ti, ds)

        promoted = promote_canary(deployed, baked.output)
        retired = RetirePreviousOperator(
            task_id="retire_previous", rollout=deployed, promoted=promoted,
            doc_md="Waits out the promotion grace period in the triggerer, then unloads the old "
                   "champion unless a route names it again.")
        rolled_back = rollback_canary()
        [deployed, baked, promoted] >> rolled_back
        [retired, rolled_back] >> report_rollout()

    features = build_features(data_gate(check_rollout_plan()))
    rollout(index(gate_model(model(features), features), features))


daily_refresh()
