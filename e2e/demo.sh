#!/usr/bin/env bash
# `make demo`: the main job on the local cluster. Installs the CRDs, runs the operator in the
# background (log: .cluster/logs/operator.log; stopped by `make cluster-down`), deploys the sample
# ModelDeployment and shows what it became.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export KUBECONFIG="$repo/.cluster/kubeconfig"
py="$repo/.venv/bin/python"
run="$repo/.cluster/run"
metrics_port="${TRAMONTANE_OPERATOR_METRICS_PORT:-18080}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [[ "${TRAMONTANE_CLUSTER_PROFILE:-}" == node ]]; then
  # The real chain: the chart installed, a tenant, a ModelDeployment whose Ray pods run on the
  # real node, and an answer through the Kubernetes Service (e2e/fullchain.py).
  exec "$repo/.venv-serving/bin/python" e2e/fullchain.py
fi
# Without root there is no real node (profile "kwok"): the operator runs here, the fleet is
# simulated, and the rendered Serve config is served on a local Ray instance.

say "Installing the Tramontane CRDs"
kubectl apply --server-side --force-conflicts -f crds/ -f policies/admission/
kubectl wait --for=condition=Established --timeout=60s crd/modeldeployments.tramontane.dev

say "Running the operator (metrics and probes on 127.0.0.1:$metrics_port)"
mkdir -p "$run" .cluster/logs
if [[ -f "$run/operator.pid" ]] && kill -0 "$(cat "$run/operator.pid")" 2>/dev/null; then
  echo "already running (pid $(cat "$run/operator.pid"))"
else
  TRAMONTANE_METRICS_PORT="$metrics_port" TRAMONTANE_METRICS_HOST=127.0.0.1 \
    setsid "$py" -m tramontane.controller >>.cluster/logs/operator.log 2>&1 </dev/null &
  echo $! >"$run/operator.pid"
  for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null \
    || { echo "operator did not become ready; see .cluster/logs/operator.log" >&2; exit 1; }
  echo "started (pid $(cat "$run/operator.pid"))"
fi

say "Creating the team-finance Tenant under the acme-eu ResidencyPolicy (config/samples/tenant.yaml)"
kubectl apply -f policies/presets/ -f config/samples/tenant.yaml
kubectl wait tenant/team-finance --for=condition=Ready --timeout=60s
kubectl get tenant team-finance
kubectl get -n team-finance resourcequota,networkpolicy,rolebinding

say "Deploying config/samples/modeldeployment.yaml"
kubectl apply -f config/samples/modeldeployment.yaml
kubectl wait -n team-finance md/llama-3-8b --for=condition=Ready --timeout=120s

say "ModelDeployment status"
kubectl get -n team-finance md llama-3-8b -o wide
kubectl get -n team-finance md llama-3-8b -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'
echo "endpoint: $(kubectl get -n team-finance md llama-3-8b -o jsonpath='{.status.endpoint}')"

say "RayService and RayCluster made by the operator and KubeRay"
kubectl get -n team-finance rayservice,raycluster

say "Ray pods and the nodes they landed on"
kubectl get -n team-finance pods -l tramontane.dev/model-deployment=llama-3-8b \
  -o custom-columns='POD:.metadata.name,TYPE:.metadata.labels.ray\.io/node-type,NODE:.spec.nodeName,STATUS:.status.phase'
echo
kubectl get nodes -L topology.kubernetes.io/region,nvidia.com/gpu.product

say "Operator metrics"
curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -E '^tramontane_(reconcile_total|managed_objects\{condition="Ready")' || true

say "The residency promise holds without the operator: a pod with no region pinning is refused"
kubectl run -n team-finance sneaky --image=rayproject/ray:2.60.0 --restart=Never \
  --overrides='{"spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":1000,"seccompProfile":{"type":"RuntimeDefault"}},"containers":[{"name":"sneaky","image":"rayproject/ray:2.60.0","securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]}}}]}}' \
  2>&1 | sed 's/^/  /' || true
echo
enter=""
if [[ "${TRAMONTANE_CLUSTER_PROFILE:-}" == node ]]; then enter="e2e/netns.sh exec "; fi
echo "Try: export KUBECONFIG=$KUBECONFIG; ${enter}kubectl scale -n team-finance md/llama-3-8b --replicas=3"

say "Serving the RayService's serveConfigV2 (as the operator rendered it) on a local Ray instance"
# No container runs in this cluster, so the Ray head cannot start in a pod: the same config is
# deployed the way KubeRay deploys it (Ray dashboard's Serve API) on a local `ray start`, with
# the tiny test model in place of the 8B weights and vLLM's CPU build. First run: ~2 minutes.
kubectl get -n team-finance rayservice llama-3-8b -o jsonpath='{.spec.serveConfigV2}' \
  >.cluster/llama-3-8b-serveconfig.yaml
"$repo/.venv-serving/bin/python" e2e/localray.py serve-rendered .cluster/llama-3-8b-serveconfig.yaml
