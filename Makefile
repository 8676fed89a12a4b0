# The two commands in the README (`make quickstart`, `make test`) do all their set-up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_DIR := .wmtp/quickstart

.PHONY: setup quickstart test

setup: $(STAMP)

# torch first, pinned: the CPU build then satisfies every later requirement and pip never fetches a CUDA one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[trainer,operator,dev]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/wmtp tiny-models $(QUICKSTART_DIR)/models
	cd $(QUICKSTART_DIR) && WMTP_MODELS=models WMTP_OUTPUT=. \
		$(CURDIR)/$(BIN)/wmtp train --config $(CURDIR)/configs/config.local.yaml \
		--recipe $(CURDIR)/configs/recipe.baseline-mtp.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q
