"""A local Kubernetes cluster made of real upstream binaries, run as plain processes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the KWOK controller (simulated
nodes: no kubelet, no containers) and the KubeRay operator, all built from Go modules by
e2e/build.sh, with TLS between every component and RBAC on, the way controller-runtime's envtest
runs a control plane, plus a scheduler and controllers so that pods really get placed.

    python e2e/localcluster.py up       start (or reuse a healthy running cluster)
    python e2e/localcluster.py down     stop every process of this cluster
    python e2e/localcluster.py status   exit 0 when the cluster is up and healthy
    python e2e/localcluster.py nodes [FILE]   (re)apply the simulated node set

Processes are identified by the state directory in their command line (.cluster/ in the repo by
default), so processes left over by a crashed run are found and replaced, never duplicated.

This module is the entry point and what the tests, benchmarks and e2e scripts import; the parts
are in e2e/cluster/ (PKI, processes, components, nodes, lifecycle, CLI).
"""

from __future__ import annotations

import sys

from cluster.base import CACHE, REAL_NODE, STATE, artifact_dirs, kubeconfig_path, versions
from cluster.cli import main
from cluster.components import COMPONENTS, component
from cluster.lifecycle import healthy, our_processes, start, stop, stop_all, up
from cluster.nodes import apply_nodes, load_nodes, node_manifest
from cluster.pki import KUBERAY_USER

__all__ = [
    "CACHE",
    "COMPONENTS",
    "KUBERAY_USER",
    "REAL_NODE",
    "STATE",
    "apply_nodes",
    "artifact_dirs",
    "component",
    "healthy",
    "kubeconfig_path",
    "load_nodes",
    "node_manifest",
    "our_processes",
    "start",
    "stop",
    "stop_all",
    "up",
    "versions",
]

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
