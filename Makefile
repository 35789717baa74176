# Tramontane developer entry points. `make demo` and `make test` work on a fresh machine:
# everything they need is built or installed on first use and cached outside the repo
# ($(TRAMONTANE_CACHE), default ~/.cache/tramontane), so the second run is fast.

SHELL := /bin/bash
.DEFAULT_GOAL := help

export TRAMONTANE_CACHE ?= $(HOME)/.cache/tramontane
# The package is not installed into the shared cached venv: it is imported from the checkout.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/e2e
PY := $(CURDIR)/.venv/bin/python
# The serving environment: everything of the dev one plus Ray Serve LLM and vLLM (CPU build).
# Tests run in it, so the serving tests use the real engine.
SPY := $(CURDIR)/.venv-serving/bin/python
# The local cluster's profile: "node" (the simulated fleet plus a real node whose pods run, in a
# network namespace of its own; needs root) or "kwok" (the simulated fleet only).
export TRAMONTANE_CLUSTER_PROFILE ?= $(if $(filter 0,$(shell id -u)),node,kwok)
# Whatever talks to the cluster runs inside its network namespace (e2e/netns.sh), where the API
# server, the node and the pods' bridge are; downloads and builds run before, outside it.
IN_CLUSTER := $(if $(filter node,$(TRAMONTANE_CLUSTER_PROFILE)),e2e/netns.sh exec,)
CLUSTER := $(IN_CLUSTER) $(PY) e2e/localcluster.py

.PHONY: bench-operator bench-serving crds docs help venv venv-serving demo-down serve-down binaries otelcol prometheus cluster cluster-down cluster-status demo lint format test test-unit test-integration test-serving

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: ## Create/reuse the cached Python environment and link it at .venv
	@hack/venv.sh requirements/dev.lock

venv-serving: ## Create/reuse the serving environment (Ray Serve LLM + vLLM CPU), linked at .venv-serving
	@hack/venv.sh requirements/serving.lock

binaries: ## Build the local cluster's binaries from Go modules (once per pinned version)
	@e2e/build.sh all $(if $(filter node,$(TRAMONTANE_CLUSTER_PROFILE)),node,)

otelcol: ## Build only the OpenTelemetry Collector that the span tests export to (part of binaries)
	@e2e/build.sh otelcol

prometheus: ## Fetch only the Prometheus server and promtool of the metrics tests (Debian's; part of binaries)
	@e2e/build.sh prometheus

.PHONY: helm
helm: ## Build only Helm (part of binaries); the unit tests render the chart's operator Deployment
	@e2e/build.sh helm

test-unit: helm

.PHONY: node-binaries
node-binaries: ## Build only a real node's binaries: containerd, runc, kubelet, kube-proxy, CNI, CoreDNS (part of binaries in the node profile)
	@e2e/build.sh node

# venv-serving first: it installs uv and fills uv's cache with the locks' wheels, which the image
# builds then install from without the network.
.PHONY: images
images: venv-serving ## Build the serving, operator and pause images as OCI archives (root; no Docker; cached by their inputs)
	@e2e/images.sh build

# The real node runs our images (pause, operator, serving): built before the cluster starts,
# which imports them into the node's containerd.
NODE_IMAGES := $(if $(filter node,$(TRAMONTANE_CLUSTER_PROFILE)),images,)

cluster: venv binaries $(NODE_IMAGES) ## Start the local cluster (or reuse a running one); kubeconfig at .cluster/kubeconfig
	@$(CLUSTER) up

cluster-down: venv ## Stop every process, container and mount of the local cluster (state in .cluster/ is kept)
	@$(CLUSTER) down
	@if [[ -x .venv-serving/bin/python ]]; then $(IN_CLUSTER) .venv-serving/bin/python e2e/localray.py down; fi
	@if [[ -n "$(IN_CLUSTER)" ]]; then e2e/netns.sh down; fi

cluster-status: venv ## Show each component of the local cluster and whether it is healthy
	@$(CLUSTER) status

demo: cluster venv-serving ## The main job: chart, tenant and a ModelDeployment answering through Kubernetes on the real node (as root; else the simulated fleet + local Ray)
	@$(IN_CLUSTER) e2e/demo.sh

demo-down: venv-serving ## Remove what `make demo` installed (release, tenant, deployment); the cluster keeps running
	@if [[ "$(TRAMONTANE_CLUSTER_PROFILE)" == node ]]; then $(IN_CLUSTER) $(SPY) e2e/fullchain.py down; else $(IN_CLUSTER) $(SPY) e2e/localray.py down; fi

serve-down: venv-serving ## Stop the local Ray instance of `make demo` (the serving endpoint)
	@$(IN_CLUSTER) $(SPY) e2e/localray.py down

crds: venv ## Regenerate crds/, policies/admission/ and policies/guard/ from the code, copy them into the chart (tests fail when stale)
	@$(PY) -m tramontane.cli crds --output crds
	@$(PY) -m tramontane.cli admission-policies --output policies/admission
	@$(PY) -m tramontane.cli guard-policies --output policies/guard
	@cp crds/*.yaml charts/tramontane/crds/
	@cp policies/admission/*.yaml charts/tramontane/files/admission/
	@mkdir -p charts/tramontane/files/guard && cp policies/guard/*.yaml charts/tramontane/files/guard/

docs: venv ## Regenerate docs/api.md (from the CRDs) and the chart's README.md (from values.yaml's `# --` comments); tests fail when stale
	@$(PY) -m tramontane.cli docs --api docs/api.md --chart charts/tramontane

bench-operator: cluster ## Benchmark: N=100 and N=1000 ModelDeployments to Reconciled, operator RSS
	@$(IN_CLUSTER) $(PY) e2e/bench_operator.py --sizes $${BENCH_SIZES:-100,1000}

bench-serving: venv-serving ## Benchmark: the app vs bare vLLM and vanilla Ray Serve LLM, engine pinned to CPU 0; ends with a summary: line
	@$(SPY) e2e/bench_serving.py

lint: venv ## ruff, mypy (strict), the import-layer contracts and hadolint (images/)
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) -m mypy
	@.venv/bin/lint-imports
	@.venv/bin/hadolint --config images/.hadolint.yaml images/operator/Dockerfile images/serving/Dockerfile

format: venv ## Apply ruff's formatting and safe fixes
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

test: venv venv-serving binaries $(NODE_IMAGES) lint ## The whole suite: lint, unit, integration and serving tests
	@$(IN_CLUSTER) $(SPY) -m pytest

# The dev environment is enough: tests that need Ray, vLLM or torch are in tests/serving.
test-unit: venv prometheus ## Unit tests only, in the dev environment (no cluster, no engine; promtool checks the alert rules)
	@$(PY) -m pytest tests/unit

test-integration: venv-serving binaries $(NODE_IMAGES) ## Integration tests on the local cluster
	@$(IN_CLUSTER) $(SPY) -m pytest -m integration

test-serving: venv-serving otelcol prometheus ## Serving tests: the real engine on a local Ray instance
	@$(IN_CLUSTER) $(SPY) -m pytest -m serving
