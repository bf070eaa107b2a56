# WaterDoctor: `make demo` runs the whole pipeline, `make test` runs every test, lint and type check.
PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
BIN := $(VENV)/bin

.PHONY: env test lint typecheck pytest load-ci demo bench clean

# Build the environment from the lock file (uv.lock); uv itself is pinned in the lock too. Compiled to bytecode
# up front: where PYTHONDONTWRITEBYTECODE is set (or site-packages is read-only) every crew and fit process would
# otherwise compile numpy, scipy and scikit-learn from source as it starts, seconds of CPU each.
PACKAGES := handoff ingest analytics alerting retention simulators waterdoctor
$(VENV)/.synced: uv.lock pyproject.toml Makefile
	test -x $(UV) || ($(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q "uv==0.13.9")
	$(UV) sync --frozen --all-groups --compile-bytecode --python $(BIN)/python
	touch $@

env: $(VENV)/.synced
	@sh scripts/ensure-prometheus.sh  # the metrics test scrapes the crews with a real Prometheus (Debian package)
	@$(BIN)/python -m compileall -q -j 0 $(PACKAGES)  # ours too (only what changed)

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: env
	$(BIN)/mypy

pytest: env
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The load proof (issue 6): 30 s at 1,000 readings/s through real Mosquitto, Redis and every crew; fails on any
# loss, duplicate or missed rate, and prints its JSON report.
load-ci: env
	$(BIN)/waterdoctor load --self-contained --rate 1000 --duration 30 --strict --report .wd-data/load-ci.json

test: lint typecheck pytest load-ci

demo: env
	$(BIN)/waterdoctor up

bench: env
	@echo "see benchmarks/RESULTS.md for each script's command"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
