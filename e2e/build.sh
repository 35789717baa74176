#!/usr/bin/env bash
# Builds the local control plane's upstream binaries from Go modules, once per pinned version.
#
# Output goes to a cache outside the repo ($TRAMONTANE_CACHE, default ~/.cache/tramontane):
#   bin/<component>-<version>/<binaries>     share/<component>-<version>/<manifests>
# A component directory only appears once its build finished (built in a temp dir, then renamed),
# so an interrupted build is redone and a deleted cache is simply rebuilt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${TRAMONTANE_CACHE:-$HOME/.cache/tramontane}"
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"

if ! command -v go >/dev/null 2>&1; then
  echo "error: Go is required to build the local control plane (https://go.dev/doc/install); 'go' is not on PATH" >&2
  exit 1
fi

log() { printf '[build] %s\n' "$*" >&2; }

# install_dir NAME VERSION BUILD_FN: runs BUILD_FN OUT_DIR unless the finished dir exists.
install_dir() {
  local name="$1" version="$2" fn="$3"
  local final="$cache/$name-$version"
  if [[ -d "$final" ]]; then
    return 0
  fi
  local tmp="$final.tmp.$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "building $name $version (first use; cached in $final)"
  local start=$SECONDS
  "$fn" "$tmp" "$version"
  mv "$tmp" "$final"
  log "built $name $version in $((SECONDS - start))s"
}

module_dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }

build_kubernetes() {
  local out="$1" version="$2" minor major
  major="${version#v}"; major="${major%%.*}"
  minor="${version#v*.}"; minor="${minor%%.*}"
  local ldflags=""
  # Stamp versions as upstream's hack/lib/version.sh does; unstamped binaries report v0.0.0.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here/kubernetes" && go build -ldflags "-s -w $ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler)
}

build_etcd() {
  (cd "$here/etcd" && go build -ldflags "-s -w" -o "$1/etcd" go.etcd.io/etcd/server/v3)
}

build_kwok() {
  GOBIN="$1" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$2"
  # The kwok controller needs Stage objects; these are the ones kwokctl uses by default.
  local src
  src="$(module_dir "sigs.k8s.io/kwok@$2")"
  {
    cat "$src/kustomize/stage/node/fast/node-initialize.yaml"
    echo "---"
    cat "$src/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"
    for f in "$src"/kustomize/stage/pod/fast/pod-*.yaml; do echo "---"; cat "$f"; done
  } > "$1/stages.yaml"
}

build_kuberay() {
  GOBIN="$1" go install -ldflags "-s -w" "github.com/ray-project/kuberay/ray-operator@$2"
  local src
  src="$(module_dir "github.com/ray-project/kuberay/ray-operator@$2")"
  mkdir -p "$1/crds" "$1/rbac"
  cp "$src"/config/crd/bases/*.yaml "$1/crds/"
  cp "$src/config/rbac/role.yaml" "$1/rbac/role.yaml"
  chmod -R u+w "$1"
}

fetch_prometheus_operator_crds() {
  local src
  src="$(module_dir "github.com/prometheus-operator/prometheus-operator@$2")"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$1/"
  done
  chmod -R u+w "$1"
}

build_helm() {
  # Stamped as upstream's Makefile does: without the Kubernetes version, `helm template` assumes
  # v1.20 and refuses our chart's kubeVersion; without the version, `helm version` says "v3.x".
  local src client_go major minor
  src="$(module_dir "helm.sh/helm/v3@$2")"
  client_go="$(sed -n 's/^\tk8s.io\/client-go v0\.\([0-9]*\)\.[0-9]*$/\1/p' "$src/go.mod")"
  major=1 minor="$client_go"
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$2"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  GOBIN="$1" go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$2"
}

build_otelcol() {
  # The wrapper module pins every collector module; the cache key must name the same release.
  if ! grep -q "^[[:space:]]go.opentelemetry.io/collector/otelcol $2\$" "$here/otelcol/go.mod"; then
    echo "error: e2e/otelcol/go.mod does not require go.opentelemetry.io/collector/otelcol $2 (OTELCOL_VERSION)" >&2
    return 1
  fi
  (cd "$here/otelcol" && go build -ldflags "-s -w -X main.version=$2" -o "$1/otelcol" .)
}

fetch_prometheus() {
  # Debian's build (server and promtool, as a platform team would install it), unpacked rather
  # than installed: no root, no service. Its binaries need only libc.
  local out="$1" version="$2"
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "error: the Prometheus of the metrics tests is Debian's package; apt-get and dpkg-deb are required" >&2
    return 1
  fi
  # A fresh machine may have no package lists yet: fetch them once (as root) and retry.
  if ! (cd "$out" && apt-get download "prometheus=$version") \
     && ! { [[ $EUID -eq 0 ]] && apt-get update -q && (cd "$out" && apt-get download "prometheus=$version"); }; then
    echo "error: apt-get could not download prometheus=$version (PROMETHEUS_DEB_VERSION); run 'apt-get update' if the package lists are missing" >&2
    return 1
  fi
  dpkg-deb -x "$out"/prometheus_*.deb "$out/deb"
  mkdir -p "$out/bin"
  mv "$out/deb/usr/bin/prometheus" "$out/deb/usr/bin/promtool" "$out/bin/"
  rm -rf "$out/deb" "$out"/prometheus_*.deb
}

mkdir -p "$cache"
targets=("${@:-all}")
for target in "${targets[@]}"; do
  case "$target" in
    all)
      install_dir etcd "$ETCD_VERSION" build_etcd
      install_dir kubernetes "$KUBERNETES_VERSION" build_kubernetes
      install_dir kwok "$KWOK_VERSION" build_kwok
      install_dir kuberay "$KUBERAY_VERSION" build_kuberay
      install_dir prometheus-operator-crds "$PROMETHEUS_OPERATOR_VERSION" fetch_prometheus_operator_crds
      install_dir helm "$HELM_VERSION" build_helm
      install_dir otelcol "$OTELCOL_VERSION" build_otelcol
      install_dir prometheus "$PROMETHEUS_DEB_VERSION" fetch_prometheus
      ;;
    etcd) install_dir etcd "$ETCD_VERSION" build_etcd ;;
    kubernetes) install_dir kubernetes "$KUBERNETES_VERSION" build_kubernetes ;;
    kwok) install_dir kwok "$KWOK_VERSION" build_kwok ;;
    kuberay) install_dir kuberay "$KUBERAY_VERSION" build_kuberay ;;
    helm) install_dir helm "$HELM_VERSION" build_helm ;;
    otelcol) install_dir otelcol "$OTELCOL_VERSION" build_otelcol ;;
    prometheus) install_dir prometheus "$PROMETHEUS_DEB_VERSION" fetch_prometheus ;;
    *) echo "error: unknown build target '$target'" >&2; exit 2 ;;
  esac
done
