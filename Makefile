# Tramontane developer entry points. `make demo` and `make test` work on a fresh machine:
# everything they need is built or installed on first use and cached outside the repo
# ($(TRAMONTANE_CACHE), default ~/.cache/tramontane), so the second run is fast.

SHELL := /bin/bash
.DEFAULT_GOAL := help

export TRAMONTANE_CACHE ?= $(HOME)/.cache/tramontane
# The package is not installed into the shared cached venv: it is imported from the checkout.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/e2e
PY := $(CURDIR)/.venv/bin/python
CLUSTER := $(PY) e2e/localcluster.py

.PHONY: bench-operator crds help venv binaries cluster cluster-down cluster-status demo lint format test test-unit test-integration

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: ## Create/reuse the cached Python environment and link it at .venv
	@hack/venv.sh requirements/dev.lock

binaries: ## Build the control-plane binaries from Go modules (once per pinned version)
	@e2e/build.sh all

cluster: venv binaries ## Start the local cluster (or reuse a running one); kubeconfig at .cluster/kubeconfig
	@$(CLUSTER) up

cluster-down: venv ## Stop every process of the local cluster (state in .cluster/ is kept)
	@$(CLUSTER) down

cluster-status: venv ## Show each component of the local cluster and whether it is healthy
	@$(CLUSTER) status

demo: cluster ## The main job: CRDs, operator and a sample ModelDeployment on the local cluster
	@e2e/demo.sh

crds: venv ## Regenerate crds/ and policies/admission/ from the code (a test fails when stale)
	@$(PY) -m tramontane.cli crds --output crds
	@$(PY) -m tramontane.cli admission-policies --output policies/admission

bench-operator: cluster ## Benchmark: N=100 and N=1000 ModelDeployments to Reconciled, operator RSS
	@$(PY) e2e/bench_operator.py --sizes $${BENCH_SIZES:-100,1000}

lint: venv ## ruff, mypy (strict) and the import-layer contracts
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) -m mypy
	@.venv/bin/lint-imports

format: venv ## Apply ruff's formatting and safe fixes
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

test: venv binaries lint ## The whole suite: lint, unit and integration tests (starts the cluster if needed)
	@$(PY) -m pytest

test-unit: venv ## Unit tests only (no cluster)
	@$(PY) -m pytest -m "not integration"

test-integration: venv binaries ## Integration tests on the local cluster
	@$(PY) -m pytest -m integration
