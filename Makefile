# ksd-run — `make run` and `make test` work on a fresh clone with nothing installed.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,wandb,slurm,joblib
# The project's shared data sets, when this checkout sits beside them (CI, the team's machines).
ifneq ($(wildcard ../shared/data),)
export KSD_DATA ?= $(abspath ../shared/data)
endif

.PHONY: install run test test-slow test-all lint bench figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, so that no dependency resolution pulls another (CUDA) build of it.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/ksd-run $(ARGS)

# The fast set (unit, property, short integration); the tests marked `slow` are left out (README).
test: install
	$(BIN)/python -m pytest -q $(ARGS)

# Only the slow set: real-data accuracy, every optimizer's resume, killed sweeps, SLURM, smoke sets.
test-slow: install
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# Both sets in one session.
test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow" $(ARGS)

# ruff, and the import layers of src/ksd ([tool.importlinter] in pyproject.toml).
lint: install
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/lint-imports

bench: install
	$(BIN)/python scripts/bench.py $(ARGS)

figures: install
	$(BIN)/python scripts/make_figures.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache .import_linter_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
