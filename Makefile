# One entry point for humans and CI: install, run, lint, test, bench.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint format bench bench-smoke

# ledger/_walbuffer.c is compiled by the editable install: a change to it needs a new one.
$(BIN)/hookledger: pyproject.toml ledger/_walbuffer.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,browser,bench]'
	@touch $@

install: $(BIN)/hookledger

run: install
	$(BIN)/hookledger serve

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The bench (bench/README.md): installs wrk from Debian when it is missing (or falls back to a
# Python load generator), starts every server itself, ends with correctness checks.
# PG_URL=postgresql://postgres@127.0.0.1:5432/test make bench  adds PostgreSQL (a database is
# made and dropped). bench-smoke proves it all works in seconds; CI runs it, judging no target.
PG_URL ?=
BENCH_ARGS ?=

$(VENV)/.bench-installed: pyproject.toml $(BIN)/hookledger
	$(BIN)/pip install --quiet -e '.[dev,browser,bench]'
	@touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run $(if $(PG_URL),--pg-url $(PG_URL)) $(BENCH_ARGS)

bench-smoke: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run --smoke $(if $(PG_URL),--pg-url $(PG_URL)) $(BENCH_ARGS)
