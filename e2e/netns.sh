#!/usr/bin/env bash
# The network namespace the local cluster lives in, so that nothing it runs can reach, or be
# reached from, any network but its own.
#
#   e2e/netns.sh up            create it (idempotent): loopback, the pods' bridge, routes
#   e2e/netns.sh exec CMD...   run CMD inside it (creating it first)
#   e2e/netns.sh down          delete it (after `make cluster-down`)
#   e2e/netns.sh check         exit 0 when this machine can run it, else say what is missing
#
# Inside: `lo`, and the bridge `cni0` with the node's address (the bridge CNI plugin attaches pods
# to it; the API server advertises this address to pods). ClusterIPs are routed onto the bridge so
# that processes of the namespace (tests, the KubeRay operator) reach Services through kube-proxy.
# The namespace has no route anywhere else: package downloads happen outside it, before.
#
# Processes enter with `nsenter --net` only (not `ip netns exec`, which also makes a private mount
# namespace: the kubelet's volume mounts would then be invisible to containerd).
set -euo pipefail

name="${TRAMONTANE_NETNS:-tramontane}"
node_ip="${TRAMONTANE_NODE_IP:-10.244.0.1}"
pod_prefix="${TRAMONTANE_POD_PREFIX:-24}"
service_cidr="${TRAMONTANE_SERVICE_CIDR:-10.96.0.0/16}"
path="/run/netns/$name"

die() { echo "error: $*" >&2; exit 1; }

check() {
  [[ $EUID -eq 0 ]] || die "the local cluster's network namespace needs root (ip netns, nsenter); run as root"
  command -v ip >/dev/null || die "'ip' is missing: apt-get install iproute2"
  command -v nsenter >/dev/null || die "'nsenter' is missing: apt-get install util-linux"
}

in_ns() { nsenter --net="$path" -- "$@"; }

up() {
  check
  [[ -e "$path" ]] || ip netns add "$name"
  in_ns ip link set lo up
  if ! in_ns ip link show cni0 >/dev/null 2>&1; then
    in_ns ip link add cni0 type bridge
  fi
  in_ns ip addr replace "$node_ip/$pod_prefix" dev cni0
  in_ns ip link set cni0 up
  # Per namespace (/proc/sys/net follows the reader's namespace): the host's stays as it was.
  in_ns sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
  in_ns ip route replace "$service_cidr" dev cni0 src "$node_ip"
}

down() {
  [[ -e "$path" ]] || return 0
  ip netns del "$name"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  check) check ;;
  exec)
    shift
    [[ $# -gt 0 ]] || die "usage: $0 exec CMD [ARG...]"
    up
    exec nsenter --net="$path" -- "$@"
    ;;
  *) die "usage: $0 up | down | check | exec CMD [ARG...]" ;;
esac
