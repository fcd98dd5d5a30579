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

## promtool comes with Debian's prometheus package (make system-deps).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
