# Two commands do everything on a fresh machine:
#   make run    install, then run the whole pipeline on the embedded default (Lite0 + demo defects)
#   make test   install, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install test-deps run test lint slow benchmarks-mlflow

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST ships in Debian (MIT); the tests read it from /usr/share/datasets/fashion-mnist.
# The operator pages' browser tests drive Debian's chromium through Playwright (never `playwright install`).
test-deps:
	@test -d /usr/share/datasets/fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

run: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/run_default.sh

test: install test-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q --durations=25

slow: install test-deps
	$(VENV)/bin/pytest -q -m slow

# The committed benchmark tables -> MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); idempotent.
benchmarks-mlflow: install
	$(PY) benchmarks/tracking.py benchmarks/results/compare_*.json
