# Two commands: `make demo` and `make test`. Both set up .venv on first use only.
# The install is the locked set in requirements.lock (`make lock` writes it), installed with uv when
# it is on PATH or can be installed into the venv, with plain pip as the fallback. torch is installed
# first with pip, pinned to the CPU wheel: uv and an unpinned resolver would pull the CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9

.PHONY: setup demo test lint typecheck bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	@if command -v uv >/dev/null 2>&1; then uv=uv; \
	elif $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"; then uv=$(BIN)/uv; \
	else uv=""; fi; \
	if [ -n "$$uv" ]; then \
		echo "installing the locked set with $$uv"; \
		$$uv pip install --quiet --python $(BIN)/python -r requirements.lock && \
		$$uv pip install --quiet --python $(BIN)/python --no-deps -e .; \
	else \
		echo "uv unavailable: installing the locked set with pip"; \
		$(BIN)/python -m pip install --quiet -r requirements.lock && \
		$(BIN)/python -m pip install --quiet --no-deps -e .; \
	fi
	touch $(STAMP)

demo: setup
	$(BIN)/quorum demo

test: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Re-resolve requirements.lock after a change to pyproject.toml (Linux x86_64, Python 3.11; torch is
# left out of the lock and installed from its pinned CPU wheel).
lock:
	@command -v uv >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	echo "torch==2.13.0+cpu" > $(VENV)/torch-override.txt
	$$(command -v uv || echo $(BIN)/uv) pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links /opt/wheels --override $(VENV)/torch-override.txt \
		--no-emit-package torch --custom-compile-command "make lock" -o requirements.lock

bench: setup
	for script in bench/tuning.py bench/pool_overhead.py bench/signing.py bench/drift.py bench/preprocess.py bench/placement.py; do \
		$(BIN)/python $$script || exit 1; \
	done

clean:
	rm -rf .quorum data
