#!/usr/bin/env bash
# Start, stop or show the embedded stack: the MLflow tracking server and `airflow standalone`.
# Each service runs in its own process group (setsid) and is stopped by that group's id,
# never by process name, so nothing else on the machine is touched.
set -euo pipefail
source "$(dirname "$0")/env.sh"
mkdir -p "$DAYLOOP_RUN_DIR" "$DAYLOOP_LOG_DIR" "$DAYLOOP_HOME/mlflow" "$AIRFLOW_HOME"

pidfile() { echo "$DAYLOOP_RUN_DIR/$1.pgid"; }
alive() { local f; f="$(pidfile "$1")"; [ -f "$f" ] && kill -0 -- "-$(cat "$f")" 2>/dev/null; }

start_service() {  # name, command...
  local name="$1"; shift
  if alive "$name"; then echo "stack: $name already running (pgid $(cat "$(pidfile "$name")"))"; return; fi
  setsid "$@" >>"$DAYLOOP_LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$name")"
  echo "stack: started $name (pgid $!), log $DAYLOOP_LOG_DIR/$name.log"
}

stop_service() {
  local name="$1" f pgid
  f="$(pidfile "$name")"
  [ -f "$f" ] || return 0
  pgid="$(cat "$f")"
  if kill -0 -- "-$pgid" 2>/dev/null; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    echo "stack: stopped $name (pgid $pgid)"
  fi
  rm -f "$f"
}

wait_http() {  # name, url, seconds
  local name="$1" url="$2" secs="$3"
  for _ in $(seq 1 "$secs"); do
    if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; then echo "stack: $name ready at $url"; return 0; fi
    alive "$name" || { echo "stack: $name exited; last log lines:" >&2; tail -n 30 "$DAYLOOP_LOG_DIR/$name.log" >&2; return 1; }
    sleep 1
  done
  echo "stack: $name not ready after ${secs}s; see $DAYLOOP_LOG_DIR/$name.log" >&2; return 1
}

case "${1:-status}" in
  start)
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_service mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$DAYLOOP_HOME/mlflow/mlflow.db" \
      --artifacts-destination "$DAYLOOP_HOME/mlflow/artifacts"
    start_service airflow airflow standalone
    wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 120
    wait_http airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" 240
    ;;
  stop)
    stop_service airflow
    stop_service mlflow
    ;;
  restart-airflow)
    # Scheduler, triggerer, DAG processor and API server together (MLflow keeps running):
    # runs and deferred tasks survive in the metadata database and resume.
    stop_service airflow
    start_service airflow airflow standalone
    wait_http airflow "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" 240
    ;;
  status)
    for s in mlflow airflow; do
      if alive "$s"; then echo "$s: running (pgid $(cat "$(pidfile "$s")"))"; else echo "$s: stopped"; fi
    done
    ;;
  *) echo "usage: $0 start|stop|restart-airflow|status" >&2; exit 2 ;;
esac
