# Dayloop: the two commands are `make demo` and `make test`. Both set up what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup demo test test-unit test-integration test-e2e stack stop status bench clean

help:
	@echo "make demo   - set up, start the embedded stack (Airflow + MLflow), run the daily loop twice"
	@echo "make test   - set up, run the whole test suite"
	@echo "make stop   - stop everything the project started"
	@echo "make status - show which services run"
	@echo "make bench  - run the benchmarks (figures printed, no asserts)"
	@echo "make clean  - stop and delete local state under var/ (keeps the venv and the dataset)"

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/stack.sh start
	@bash -c 'source scripts/env.sh && python scripts/demo.py'

test: setup
	@bash scripts/test.sh

test-unit: setup
	@bash scripts/test.sh tests/unit tests/dags

test-integration: setup
	@bash scripts/test.sh tests/integration

test-e2e: setup
	@bash scripts/test.sh tests/e2e

stack: setup
	@bash scripts/stack.sh start

stop:
	@bash scripts/stack.sh stop

status:
	@bash scripts/stack.sh status

bench: setup
	@bash -c 'source scripts/env.sh && for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b || exit 1; done'

clean: stop
	rm -rf var
