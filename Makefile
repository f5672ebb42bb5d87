# Two entry points: `make run` (the main job) and `make test` (lint, types, tests).
# Each creates .venv when it is missing and installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml src/nnvitals/_kernel.c | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml src/nnvitals/_kernel.c | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
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
