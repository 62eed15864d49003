# `make test` and `make run` work on a fresh machine: they create .venv and install pinned versions.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test run experiments clean bench bench-quick bench-deps

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Two xdist workers (TEST_WORKERS=0: one process): much of the suite is XLA compilation, which is mostly
# single-threaded, so two workers overlap it (16.9 -> 13.2-13.7 min on 2 cores). `worksteal` evens out the long tests.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# glibc backs large allocations with huge pages: BPTT's multi-GB full-unroll tape, allocated anew every step,
# then costs thousands of page faults instead of ~900,000 (benchmarks/NOTES.md). Harmless elsewhere.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

run: $(STAMP)
	$(PY) -m bptt_jax.train

# Every table and figure of the paper (experiments/paper.py): results/paper/*.md and *.png, runs in runs/paper
# (a finished run is reused, so an interrupted `make experiments` continues where it stopped).
experiments: $(STAMP)
	$(PY) -m experiments.paper all

# Benchmarks (benchmarks/NOTES.md): JSON lines + tables on stdout, results in benchmarks/results/.
# The PyTorch reference needs the CPU build of torch==2.13.0 (extra `bench`); pass e.g. BENCH_ARGS="--only bptt_jax".
BENCH_ARGS ?=
bench-deps: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0

bench: bench-deps
	$(PY) -m benchmarks.run $(BENCH_ARGS)

bench-quick: bench-deps
	$(PY) -m benchmarks.run --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
