# Two commands for a new user: `make demo` and `make test`. Each sets itself up and is safe to run twice.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DRIVER ?= native

export PYTHONPATH := $(CURDIR)/include:$(CURDIR)
export PGU_PG_BIN_DIRS ?= $(CURDIR)/.local/pg17/bin

.PHONY: demo down test lint lock venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip sync --quiet --python $(PY) requirements.txt
	touch $@

# DRIVER=pgactive runs the demo with the pgactive driver; point PGU_OLD_PG_BIN and PGU_NEW_PG_BIN at
# pgactive-enabled PostgreSQL 15 and 17 bin directories (pgactive is not in any package registry).
demo: venv
	PGU_DRIVER=$(DRIVER) $(PY) -m topology.demo up

down: venv
	$(PY) -m topology.demo down

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff and mypy with the settings in pyproject.toml; .ci/run runs it before the tests.
lint: venv
	$(VENV)/bin/ruff check include dags plugins topology bench tests
	$(VENV)/bin/mypy

# Regenerate the hashed lock after editing requirements.in.
lock: venv
	$(VENV)/bin/uv pip compile requirements.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.txt

clean: down
	rm -rf .local $(VENV)
