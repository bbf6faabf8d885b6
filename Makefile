# Dayloop: the two commands are `make demo` and `make test`. Both set up what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test test-unit test-integration test-e2e lint stack serve stop status bench clean

help:
	@echo "make demo   - set up, start the stack (Airflow, MLflow, data plane), run the daily loop, serve it"
	@echo "make test   - set up, run the lint and layering checks, then the whole test suite"
	@echo "make lint   - ruff and the import-linter layering contracts only"
	@echo "make serve  - start the data plane: Triton, index service, 2 routers, Prometheus"
	@echo "make stop   - stop everything the project started"
	@echo "make status - show which services run"
	@echo "make bench  - run the benchmarks (figures printed, no asserts)"
	@echo "make clean  - stop and delete local state under var/ (keeps the venv and the dataset)"

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/stack.sh start
	@bash scripts/serve.sh start
	@bash -c 'source scripts/env.sh && python scripts/demo.py'

test: setup lint
	@bash scripts/test.sh

lint: setup
	@bash scripts/lint.sh

test-unit: setup
	@bash scripts/test.sh tests/unit tests/dags

test-integration: setup
	@bash scripts/test.sh tests/integration

test-e2e: setup
	@bash scripts/test.sh tests/e2e

stack: setup
	@bash scripts/stack.sh start

serve: setup
	@bash scripts/serve.sh start

stop:
	@bash scripts/serve.sh stop
	@bash scripts/stack.sh stop

status:
	@bash scripts/stack.sh status
	@bash scripts/serve.sh status

bench: setup
	@bash -c 'source scripts/env.sh && for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b || exit 1; done'

clean: stop
	rm -rf var
