# Two entry points: `make run` (the main job) and `make test` (lint, types, tests).
# Each creates .venv when it is missing and installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The compiled parts (setup.py) are built against the torch of .venv itself, installed first: without build
# isolation, no second copy of torch is installed for the build.
BUILT := pyproject.toml setup.py src/nnvitals/_kernel.c src/nnvitals/_autograd.cpp src/nnvitals/_autograd.h
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
BUILD_NEEDS := "setuptools>=74" torch==2.13.0

$(VENV)/.installed: $(BUILT) | $(BIN)/python
	$(PIP) $(BUILD_NEEDS)
	$(PIP) --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(BUILT) | $(BIN)/python
	$(PIP) $(BUILD_NEEDS)
	$(PIP) --no-build-isolation -e '.[test]'
	touch $(VENV)/.installed $@

# The main job: the makemore part 3 lab, quick profile, on the lesson's data when it is available
# (NNVITALS_DATA or a fetched copy), else on the embedded default. The report lands in runs/.
run: $(VENV)/.installed
	$(BIN)/nnvitals lab

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy src/nnvitals

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
