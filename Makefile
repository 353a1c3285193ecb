# Two commands: `make demo` and `make test`. Both set up .venv on first use only.
# The install is the locked set in requirements.lock (`make lock` writes it) plus torch's CPU build,
# installed with uv when it is on PATH or can be installed into the venv, with plain pip as the fallback.
# torch is pinned to its CPU wheel by its local version (+cpu): an unpinned resolver would pull the CUDA build.
# uv compiles the bytecode at install (--compile-bytecode), as pip does: otherwise the first command
# after a fresh install compiles every module it imports (over a minute on a busy 2-core machine).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
TORCH := torch==2.13.0+cpu
# where that CPU wheel comes from: the wheel folder pip is configured with, else PyTorch's CPU index page
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)

.PHONY: setup demo test lint bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v uv >/dev/null 2>&1; then uv=uv; \
	elif $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"; then uv=$(BIN)/uv; \
	else uv=""; fi; \
	if [ -n "$$uv" ]; then \
		echo "installing the locked set with $$uv"; \
		$$uv pip install --quiet --compile-bytecode --python $(BIN)/python --find-links "$(TORCH_FIND_LINKS)" "$(TORCH)" \
			-r requirements.lock && \
		$$uv pip install --quiet --python $(BIN)/python --no-deps -e .; \
	else \
		echo "uv unavailable: installing the locked set with pip"; \
		$(BIN)/python -m pip install --quiet --find-links "$(TORCH_FIND_LINKS)" "$(TORCH)" -r requirements.lock && \
		$(BIN)/python -m pip install --quiet --no-deps -e .; \
	fi
	touch $(STAMP)

demo: setup
	$(BIN)/quorum demo

test: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# mypy cannot see the quorum.X -> X/ mapping (package-dir in pyproject.toml): build/mypy/quorum mirrors it
# with one symlink per folder, read from package-dir, and [tool.mypy] points mypy there.
MYPY_TREE := build/mypy/quorum

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"].values())' \
		| tr ' ' '\n' | while read -r folder; do ln -s "$(CURDIR)/$$folder" "$(MYPY_TREE)/$$folder"; done
	$(BIN)/mypy

# Re-resolve requirements.lock after a change to pyproject.toml (Linux x86_64, Python 3.11; torch is
# left out of the lock and installed from its pinned CPU wheel).
lock:
	@command -v uv >/dev/null 2>&1 || $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	echo "$(TORCH)" > $(VENV)/torch-override.txt
	$$(command -v uv || echo $(BIN)/uv) pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links "$(TORCH_FIND_LINKS)" --override $(VENV)/torch-override.txt \
		--no-emit-package torch --custom-compile-command "make lock" -o requirements.lock

bench: setup
	for script in bench/tuning.py bench/pool_overhead.py bench/signing.py bench/drift.py bench/preprocess.py bench/placement.py; do \
		$(BIN)/python $$script || exit 1; \
	done

clean:
	rm -rf .quorum data
