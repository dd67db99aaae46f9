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

.PHONY: install demo test lint format bench clean

install: $(STAMP)

# Tesseract serves OCR on premises (the vision_api route's `local` provider): Debian's tesseract-ocr.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch 2.14.1 / torchvision 0.29.1 come from this machine's local package files (pip config), no download.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11+) on PATH"; exit 1; }
	@command -v tesseract >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq tesseract-ocr >/dev/null; } || \
		{ echo "could not install tesseract-ocr (apt-get); install it by hand for on-premises OCR"; exit 1; }
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
