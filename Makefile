# reactor — common tasks. `make install` creates .venv; everything else uses it.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install test test-fast test-container lint bench demo system-deps clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## Test processes: two per core (a test waits on its children and Postgres about half the
## time), at least 4, at most 8 (each has its own throwaway clusters). `make test WORKERS=N`.
## (getconf, not nproc: nproc follows OMP_NUM_THREADS.)
WORKERS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2); w=$$((n * 2)); \
	[ $$w -lt 4 ] && w=4; [ $$w -gt 8 ] && w=8; echo $$w)

system-deps:
	scripts/install-system-deps

## Test processes write bytecode even where the environment says not to (Python images
## set PYTHONDONTWRITEBYTECODE=1): otherwise each of them compiles, and pytest rewrites
## the asserts of, every test module anew (~3 s of CPU a process).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest

## The whole suite against a throwaway Postgres (includes the ~1 min pg_cron test).
test: install system-deps
	$(PYTEST) -n $(WORKERS) --dist worksteal -m "not container"

## Everything but the tests that wait on pg_cron's minute tick.
test-fast: install system-deps
	$(PYTEST) -n $(WORKERS) --dist worksteal -m "not slow and not container"

## The image: deploy/Dockerfile built and run with podman against a throwaway Postgres
## (docs/operations.md, "The container image"). Skips where podman cannot run.
test-container: install
	WITH_CONTAINER=1 scripts/install-system-deps
	$(PYTEST) -m container tests/system/test_container.py

## The import contract (the engine knows no app; its layers import downward) is checked
## by import-linter from a venv of its own: it brings rich, which structlog imports
## whenever it is installed, ~0.15 s of CPU in each of the suite's child processes.
LINT_VENV ?= .venv-lint

$(LINT_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q 'import-linter>=2.0'
	touch $@

## promtool comes with Debian's prometheus package (make system-deps).
lint: install $(LINT_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	PYTHONPATH=. $(LINT_VENV)/bin/lint-imports
	$(BIN)/hadolint deploy/Dockerfile
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml

## The whole system on this machine with demo data: mails, a PDF, live events.
demo: install system-deps
	$(BIN)/reactor dev

bench: install system-deps
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(LINT_VENV) .pytest_cache .mypy_cache .ruff_cache
