# WaterDoctor: `make demo` runs the whole pipeline, `make test` runs every test, lint and type check.
PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
BIN := $(VENV)/bin

.PHONY: env test lint typecheck pytest demo bench clean

# Build the environment from the lock file (uv.lock); uv itself is pinned in the lock too.
$(VENV)/.synced: uv.lock pyproject.toml
	test -x $(UV) || ($(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q "uv==0.13.9")
	$(UV) sync --frozen --all-groups --python $(BIN)/python
	touch $@

env: $(VENV)/.synced

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: env
	$(BIN)/mypy

pytest: env
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck pytest

demo: env
	$(BIN)/waterdoctor up

bench: env
	@echo "see benchmarks/RESULTS.md for each script's command"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
