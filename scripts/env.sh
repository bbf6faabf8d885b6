# Environment shared by every Dayloop script. Source it; override any variable before.
DAYLOOP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DAYLOOP_ROOT
export DAYLOOP_VAR="${DAYLOOP_VAR:-$DAYLOOP_ROOT/var}"
export DAYLOOP_HOME="${DAYLOOP_HOME:-$DAYLOOP_VAR/dayloop}"
export DAYLOOP_VENV="${DAYLOOP_VENV:-$DAYLOOP_ROOT/.venv}"
export DAYLOOP_SERVING_VENV="${DAYLOOP_SERVING_VENV:-$DAYLOOP_ROOT/.venv-serving}"
export DAYLOOP_RUN_DIR="$DAYLOOP_VAR/run"
export DAYLOOP_LOG_DIR="$DAYLOOP_VAR/log"

export AIRFLOW_HOST="${AIRFLOW_HOST:-127.0.0.1}"
export AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"

# Airflow: standalone (LocalExecutor, SQLite), sized for a 2-core machine.
export AIRFLOW_HOME="${AIRFLOW_HOME:-$DAYLOOP_VAR/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$DAYLOOP_ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$DAYLOOP_ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="${AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG:-2}"
export AIRFLOW__API__HOST="$AIRFLOW_HOST"
export AIRFLOW__API__PORT="$AIRFLOW_PORT"
export AIRFLOW__API__WORKERS=1
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$AIRFLOW_PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$AIRFLOW_PORT/execution/"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=20
export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK=True
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-INFO}"

# MLflow: tracking server on SQLite with proxied artifacts; tasks talk to it over HTTP.
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT}"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# The embedded stack's rollouts use the demo plan (seconds per step); a production
# deployment sets prod (hours). A run's Params can choose either.
export DAYLOOP_ROLLOUT_PROFILE="${DAYLOOP_ROLLOUT_PROFILE:-demo}"
# Router fault injection (canary NaN/latency/errors) for demos and tests only.
export DAYLOOP_FAULT_INJECTION="${DAYLOOP_FAULT_INJECTION:-0}"

export PATH="$DAYLOOP_VENV/bin:$PATH"
