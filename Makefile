# `make demo` and `make test` are all the set-up a fresh machine needs (Python 3.11, pip).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install                 ## the default (digits) end to end: train, forget one sample, compare
	dvc repro
	obliviate info
	obliviate forget $$(obliviate ids --block 5 --limit 1)
	obliviate retrain --naive

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

test: lint                    ## lint + the whole test suite (slow tests included)
	pytest

test-fast: lint               ## lint + unit tests only
	pytest -m "not slow"

bench: install                ## stored-training overhead benchmark (see docs/benchmarks.md)
	python benchmarks/stored_training.py

clean:
	rm -rf data/blocks data/test.npz models/store.zarr metrics .prefect
