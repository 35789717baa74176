"""Where the cluster keeps its state and finds its binaries, its profile, and kubectl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent.parent
REPO = E2E_DIR.parent
STATE = Path(os.environ.get("TRAMONTANE_CLUSTER_DIR", REPO / ".cluster")).resolve()
CACHE = Path(os.environ.get("TRAMONTANE_CACHE", Path.home() / ".cache" / "tramontane"))

# "node": the simulated fleet plus a real node whose pods run (e2e/realnode.py), all in the
# network namespace of e2e/netns.sh; needs root. "kwok": the simulated fleet only, on loopback.
PROFILE = os.environ.get("TRAMONTANE_CLUSTER_PROFILE") or ("node" if os.geteuid() == 0 else "kwok")
if PROFILE not in ("node", "kwok"):
    raise SystemExit(f"TRAMONTANE_CLUSTER_PROFILE={PROFILE!r}: expected 'node' or 'kwok'")
REAL_NODE = PROFILE == "node"


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


class ClusterError(RuntimeError):
    """A prerequisite is missing or a component failed to become healthy."""


def versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (E2E_DIR / "versions.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key] = value
    return pins


# Cache directory (e2e/build.sh's `<name>-<version>`) → the versions.env pin of its version.
CONTROL_PLANE_ARTIFACTS = {
    "etcd": "ETCD_VERSION",
    "kubernetes": "KUBERNETES_VERSION",
    "kwok": "KWOK_VERSION",
    "kuberay": "KUBERAY_VERSION",
    "prometheus-operator-crds": "PROMETHEUS_OPERATOR_VERSION",
    "helm": "HELM_VERSION",
}
NODE_ARTIFACTS = {
    "containerd": "CONTAINERD_VERSION",
    "runc": "RUNC_VERSION",
    "crictl": "CRICTL_VERSION",
    "cni-plugins": "CNI_PLUGINS_VERSION",
    "kubelet": "KUBERNETES_VERSION",
    "coredns": "COREDNS_VERSION",
}


def _cache_dirs(artifacts: dict[str, str]) -> dict[str, Path]:
    pins = versions()
    return {name: CACHE / f"{name}-{pins[pin]}" for name, pin in artifacts.items()}


def artifact_dirs() -> dict[str, Path]:
    """What this profile's cluster runs, in the cache."""
    return _cache_dirs({**CONTROL_PLANE_ARTIFACTS, **(NODE_ARTIFACTS if REAL_NODE else {})})


def node_artifact_dirs() -> dict[str, Path]:
    return _cache_dirs(NODE_ARTIFACTS)


def kubeconfig_path() -> Path:
    return STATE / "kubeconfig"


def kubectl(*args: str, input_text: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig_path()}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout
