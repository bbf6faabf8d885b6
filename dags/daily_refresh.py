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

Every task is one call into `dayloop.airflow.tasks`; logic lives in `include/dayloop`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task, task_group

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
    dagrun_timeout=pendulum.duration(hours=6),
    tags=["dayloop", "training", "daily"],
    doc_md=__doc__,
    params={
        "train_epochs": Param(None, type=["null", "integer"], minimum=1, maximum=50,
                              description="Override the number of training epochs."),
        "noninferiority_margin": Param(None, type=["null", "number"], minimum=0.0, maximum=0.5,
                                       description="Override the offline gate's non-inferiority margin."),
        "index_recall_floor": Param(0.95, type="number", minimum=0.5, maximum=1.0,
                                    description="Minimum recall@100 of the FAISS index vs exact search."),
    },
)
def daily_refresh():
    @task_group(group_id="data_gate")
    def data_gate():
        @task
        def land_partition(ds=None) -> dict:
            """Land the logical day's interaction partition (seeds history on the first run)."""
            from dayloop.airflow import tasks

            return tasks.land_partition(ds)

        @task
        def validate_partition(landed: dict, ds=None) -> dict:
            """Great Expectations suite + volume and drift checks; quarantine on failure."""
            from dayloop.airflow import tasks

            return tasks.validate_partition(ds)

        return validate_partition(land_partition())

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

    features = build_features(data_gate())
    index(gate_model(model(features), features), features)


daily_refresh()
