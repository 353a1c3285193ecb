# Two commands: `make demo` and `make test`. Both set up .venv on first use only.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/quorum demo

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy flows tasks lineage evaluation configs

bench: setup
	for script in bench/tuning.py bench/pool_overhead.py bench/signing.py bench/drift.py bench/preprocess.py; do \
		$(BIN)/python $$script || exit 1; \
	done

clean:
	rm -rf .quorum data
