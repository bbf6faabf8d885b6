#!/usr/bin/env bash
# The checks `make test` runs before the suite: ruff (pyflakes, isort, bugbear, complexity;
# configured in pyproject.toml) and the import-linter layering contracts (pyproject.toml).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${DAYLOOP_VENV:-$ROOT/.venv}"
echo "lint: ruff"
"$VENV/bin/ruff" check include serving dags plugins scripts tests benchmarks
echo "lint: import contracts"
# The DAG folder is a package only for this check; include/ and the root make dayloop,
# serving and dags importable without the editable install's path hooks.
PYTHONPATH="$ROOT/include:$ROOT" "$VENV/bin/lint-imports" --no-cache
