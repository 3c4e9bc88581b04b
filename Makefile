# Every target is a thin call of the `asda` command line; `setup` runs first wherever it is needed, so a fresh
# clone needs nothing but `make <target>`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-all lint model-info clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## test: the fast suite (everything not marked slow)
test: setup lint
	$(BIN)/pytest -q -m "not slow"

## test-all: every test, slow ones included
test-all: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check model pipelines sweeps bench tests

## model-info: resolved config and parameter counts, e.g. make model-info PRESET=tiny ARGS="diff_lambda=0.5"
PRESET ?= base
ARGS   ?=
model-info: setup
	$(BIN)/asda model --preset $(PRESET) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
