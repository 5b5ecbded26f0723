# `make demo` and `make test` are all the set-up a fresh machine needs (Python 3.11, pip).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-fast verify-cycle lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install                 ## digits end to end: train, forget the owner, consolidate, replay, compare, verify
	dvc repro
	obliviate info
	@owner="$$(obliviate ids --owner)"; \
	  if [ -n "$$owner" ]; then obliviate forget $$owner; \
	  else echo "the owner's samples are already forgotten"; fi
	obliviate consolidate
	obliviate replay --sample 5
	obliviate retrain --naive
	obliviate verify

lint: install
	ruff check .
	ruff format --check .

format: install
	ruff check --fix .
	ruff format .

# pytest-xdist workers; each takes whole test files (modules share session templates)
WORKERS ?= 2

test: lint                    ## lint + the whole test suite (slow tests included)
	pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: lint               ## lint + unit tests only
	pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

verify-cycle: install        ## CI: train, forget the backdoored owner via a queued request, gate (scratch dir)
	.ci/verify-cycle

bench: install                ## every table of docs/benchmarks.md and docs/report.md (~6 h)
	export OBLIVIATE_BENCH_COMMIT="$$(python -c 'import sys; sys.path.insert(0, "benchmarks"); \
	  import stamp; print(stamp.commit())')" && \
	python benchmarks/stored_training.py && \
	python benchmarks/deletion.py --case fashion-mnist-lenet5 --case purchase-mlp && \
	python benchmarks/stitch_point.py && \
	python benchmarks/stream.py && \
	python benchmarks/stream.py --requests 20 && \
	python benchmarks/stream.py --exact --only "guard only" extend consolidate && \
	python benchmarks/stream.py --exact --requests 50 --only "every 10" "every 25" drift && \
	python benchmarks/stream.py --exact --case purchase-mlp --only "guard only" extend consolidate && \
	for seed in 0 1 2; do for bound in 0.005 0.01; do python benchmarks/stream.py --requests 50 \
	  --seed $$seed --max-accuracy-drop $$bound --out benchmarks/results/curve50 || exit 1; \
	  done; done && \
	python benchmarks/stream.py --requests 50 --max-accuracy-drop 0.02 \
	  --out benchmarks/results/curve50 && \
	python benchmarks/stream.py --curve-from benchmarks/results/curve50/stream*.json && \
	python benchmarks/pretrained.py && \
	python benchmarks/memory.py && \
	python benchmarks/sisa.py && \
	python benchmarks/report.py

clean:
	rm -rf data/blocks data/test.npz models/store.zarr models/naive.zarr metrics reports .prefect
