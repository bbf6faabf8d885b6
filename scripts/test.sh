#!/usr/bin/env bash
# Run the test suite in the project venv. Fails loudly: pytest's exit code 5
# ("no tests collected") is a failure here too.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
# Tests make their own homes, databases and ports; never point them at a demo stack.
unset MLFLOW_TRACKING_URI AIRFLOW_HOME DAYLOOP_HOME DAYLOOP_VAR DAYLOOP_REPLAY_START DAYLOOP_PLANE_FILE \
  DAYLOOP_SERVING_HOME DAYLOOP_ROLLOUT_PROFILE DAYLOOP_PLANT_FAULTS DAYLOOP_FAULT_INJECTION
python -m pytest "${@:-tests}" -p no:cacheprovider
rc=$?
if [ "$rc" -eq 5 ]; then echo "test: no tests ran; treating as failure" >&2; exit 1; fi
exit "$rc"
