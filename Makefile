# The two commands of the README: `make demo` (install + run the main job) and `make test` (lint, then the suite).
# TORCH pins the CPU build where one is provided locally; on a GPU machine use e.g. TORCH="torch>=2.3".
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: install demo lint test bench

$(BIN)/brats: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/brats

demo: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/brats demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/ingest.py
