#!/usr/bin/env bash
# Builds the local control plane's upstream binaries from Go modules, once per pinned version;
# target `node` builds those of a real Kubernetes node (containerd, runc, kubelet, ...).
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

# kube_ldflags VERSION: stamps versions as upstream's hack/lib/version.sh does; unstamped binaries
# report v0.0.0.
kube_ldflags() {
  local version="$1" minor major ldflags="-s -w"
  major="${version#v}"; major="${major%%.*}"
  minor="${version#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldflags"
}

build_kubernetes() {
  local out="$1" ldflags
  ldflags="$(kube_ldflags "$2")"
  (cd "$here/kubernetes" && go build -ldflags "$ldflags" -o "$out/" \
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

# --- A real Kubernetes node (target `node`): containerd, runc, CNI, kubelet, kube-proxy, CoreDNS.

# need_deb PACKAGE WHAT: a Debian build dependency of a node component. Installed when we are root
# (a fresh CI machine has none of them); the package lists are fetched only if that install fails.
need_deb() {
  local pkg="$1" what="$2"
  if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" == installed ]]; then
    return 0
  fi
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's $pkg for $what"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" \
       || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg"; }; then
      return 0
    fi
  fi
  echo "error: $what needs Debian's package $pkg; install it as root: apt-get install $pkg" >&2
  return 1
}

# need_cc WHAT: a C compiler and libc's headers and static library (cgo, or plain C).
need_cc() {
  need_deb gcc "$1"
  need_deb libc6-dev "$1"
}

# wrapper_pins DIR MODULE VERSION: e2e/DIR (a wrapper module) builds MODULE at VERSION, so that the
# cache directory, named from versions.env, holds what its name says.
wrapper_pins() {
  local pinned
  pinned="$(cd "$here/$1" && go list -m -f '{{.Version}}' "$2")"
  if [[ "$pinned" != "$3" ]]; then
    echo "error: e2e/$1/go.mod requires $2 $pinned but versions.env pins $3; change both together" >&2
    return 1
  fi
}

build_containerd() {
  # Without cgo, and without the snapshotters that need host libraries (the static release's
  # choice). The shim sits next to containerd, which looks there when the shim is not on PATH.
  local pkg=github.com/containerd/containerd/v2
  local ldflags="-s -w -X $pkg/version.Version=$2"
  GOBIN="$1" go install -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" -ldflags "$ldflags" \
    "$pkg/cmd/containerd@$2" "$pkg/cmd/ctr@$2"
  # no_grpc as upstream's Makefile builds the shim: it serves ttrpc only.
  GOBIN="$1" go install -tags "no_grpc urfave_cli_no_docs" -ldflags "$ldflags" \
    "$pkg/cmd/containerd-shim-runc-v2@$2"
}

build_runc() {
  # seccomp (RuntimeDefault pods) needs cgo and libseccomp. Not runc's Makefile: its default tags
  # add libpathrs, which Debian 12 does not package.
  need_cc "runc (cgo)"
  need_deb libseccomp-dev "runc's seccomp support"
  GOBIN="$1" CGO_ENABLED=1 go install -tags "seccomp urfave_cli_no_docs" -ldflags "-s -w" \
    "github.com/opencontainers/runc@$2"
}

build_crictl() {
  # Stamped as upstream's Makefile does (without the "v").
  GOBIN="$1" go install -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${2#v}" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$2"
}

build_cni_plugins() {
  # Only the plugins of the node's bridge network; this directory is containerd's CNI bin_dirs.
  local pkg=github.com/containernetworking/plugins
  GOBIN="$1" go install -ldflags "-s -w -X $pkg/pkg/utils/buildversion.BuildVersion=$2" \
    "$pkg/plugins/main/bridge@$2" "$pkg/plugins/main/loopback@$2" \
    "$pkg/plugins/ipam/host-local@$2" "$pkg/plugins/meta/portmap@$2"
}

build_kubelet() {
  # From the control plane's wrapper module (its tools.go pins these two commands too).
  local ldflags
  wrapper_pins kubernetes k8s.io/kubernetes "$2"
  ldflags="$(kube_ldflags "$2")"
  (cd "$here/kubernetes" && go build -ldflags "$ldflags" -o "$1/" \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy)
}

build_pause() {
  # The pod sandbox's process, compiled as upstream's build/pause/Makefile does: static, so its
  # image needs nothing else. The source ships in the k8s.io/kubernetes module (no Go package).
  need_cc "the pause binary (static C)"
  local src tag
  src="$(cd "$here/kubernetes" && module_dir "k8s.io/kubernetes@$2")/build/pause"
  tag="$(sed -n 's/^TAG ?= *//p' "$src/Makefile")"
  gcc -Os -Wall -Werror -static -DVERSION="v$tag" -o "$1/pause" "$src/linux/pause.c"
}

build_coredns() {
  # Only the plugins of cluster DNS (e2e/coredns/main.go): every plugin would mean every cloud SDK.
  wrapper_pins coredns github.com/coredns/coredns "$2"
  (cd "$here/coredns" && go build -ldflags "-s -w" -o "$1/coredns" .)
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
    node)
      # Not part of `all`: only the real node's profile needs it (and root, for Debian packages).
      # kube-proxy programs nftables through the `nft` command.
      need_deb nftables "kube-proxy (nftables mode)"
      install_dir pause "$KUBERNETES_VERSION" build_pause
      install_dir runc "$RUNC_VERSION" build_runc
      install_dir containerd "$CONTAINERD_VERSION" build_containerd
      install_dir crictl "$CRICTL_VERSION" build_crictl
      install_dir cni-plugins "$CNI_PLUGINS_VERSION" build_cni_plugins
      install_dir kubelet "$KUBERNETES_VERSION" build_kubelet
      install_dir coredns "$COREDNS_VERSION" build_coredns
      ;;
    pause) install_dir pause "$KUBERNETES_VERSION" build_pause ;;
    prometheus) install_dir prometheus "$PROMETHEUS_DEB_VERSION" fetch_prometheus ;;
    *) echo "error: unknown build target '$target'" >&2; exit 2 ;;
  esac
done
