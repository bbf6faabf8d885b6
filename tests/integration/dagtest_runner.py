"""Run one `dag.test()` of a DAG in this (fresh) process and print a JSON summary.

Usage: python dagtest_runner.py <dags_folder> <dag_id> <YYYY-MM-DD> [conf-json]
"""

import json
import sys

import pendulum
from airflow.dag_processing.dagbag import DagBag

folder, dag_id, day = sys.argv[1:4]
conf = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
bag = DagBag(dag_folder=folder)
assert not bag.import_errors, bag.import_errors
dag = bag.dags[dag_id]
run = dag.test(logical_date=pendulum.parse(day).in_timezone("UTC"), run_conf=conf)
states = {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state)
          for ti in run.get_task_instances()}
state = run.state.value if hasattr(run.state, "value") else str(run.state)
print("DAGTEST-RESULT " + json.dumps({"state": state, "tasks": states}))
