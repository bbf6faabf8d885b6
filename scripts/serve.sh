#!/usr/bin/env bash
# Start, stop or show the data plane (Triton, index service, router replicas, Prometheus,
# and the user simulator when the demo started it). Each runs in its own process group,
# recorded under var/serving/run and stopped by that group id, never by name.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$DAYLOOP_ROOT"
exec "$DAYLOOP_SERVING_VENV/bin/python" -m serving.launch "${1:-status}"
