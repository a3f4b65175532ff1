# The two commands of the quick start: `make demo` and `make test`.
# Each creates or updates the virtualenv from pyproject.toml, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

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
