# visionroute: `make demo` runs the main job, `make test` the tests; both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export VISIONROUTE_STATE ?= $(CURDIR)/.state
# Prefect keeps its own state (ephemeral server database) inside the project too.
export PREFECT_HOME ?= $(CURDIR)/.state/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install demo test lint format bench clean up status down

install: $(STAMP)

# Debian packages: tesseract-ocr serves OCR on premises (the vision_api route's `local` provider); chromium is
# the real browser the tests read the Prefect UI with.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := tesseract-ocr:tesseract chromium:chromium

# torch 2.14.1 / torchvision 0.29.1 come from this machine's local package files (pip config), no download.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+) on PATH"; exit 1; }
	@missing=""; for entry in $(APT_PACKAGES); do command -v $${entry#*:} >/dev/null || missing="$$missing $${entry%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; } || \
		{ echo "could not install$$missing with apt-get; install them by hand"; exit 1; }; \
	fi
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(PREFECT_HOME)
	$(PY) examples/demo.py

test: $(STAMP)
	@mkdir -p $(PREFECT_HOME)
	$(PY) -m pytest -q

# The user's day: Prefect + MLflow servers, work pools, deployments and workers (see README, "Operating").
# PREFECT_PORT=4300 MLFLOW_PORT=5300 make up picks other ports.
up: $(STAMP)
	$(VENV)/bin/visionroute up $(if $(PREFECT_PORT),--prefect-port $(PREFECT_PORT)) $(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT))

status: $(STAMP)
	$(VENV)/bin/visionroute status

down: $(STAMP)
	$(VENV)/bin/visionroute down

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	@echo "bench/finetune.py DATA_ROOT and bench/decide.py take paths: see bench/RESULTS.md"

clean:
	rm -rf .state .pytest_cache
