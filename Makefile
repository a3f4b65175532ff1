# The two commands of the quick start: `make demo` and `make test`.
# Each creates or updates the virtualenv from pyproject.toml, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-full venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "railwatch needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/railwatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check service tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var demo-output .pytest_cache

# The accuracy benchmark on held-out seeds (not part of `make test`; ~5-10 min on 2 cores).
# Options: make bench-accuracy ARGS="--split tune" or ARGS="--full" (see bench/accuracy/README.md).
.PHONY: bench-accuracy
bench-accuracy: $(STAMP)
	$(BIN)/python bench/accuracy/run.py $(ARGS)

# Performance benchmarks (issue 8; bench/README.md): each prints its table with ratios measured in
# the same run. `make bench` takes about 6 minutes on 2 cores; `make bench-full` adds the 400 km²
# and 1000-AOI cases (44 min on 2 cores). Peers (rasterstats, exactextract) come with the `bench` extra.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/units.py

bench-full: $(BENCH_STAMP)
	$(BIN)/python bench/kernel.py --full
	$(BIN)/python bench/memory.py --full
	$(BIN)/python bench/throughput.py --full
	$(BIN)/python bench/units.py
