"""Nodes: the simulated fleet (KWOK Nodes from e2e/nodes.yaml), and the images of the real node."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

import realnode
from cluster.base import E2E_DIR, STATE, ClusterError, artifact_dirs, kubectl, log

NODES_FILE = E2E_DIR / "nodes.yaml"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node_manifest(node: dict[str, Any], pool: dict[str, Any]) -> dict[str, Any]:
    """A KWOK-managed Node with the labels, capacity and taints of a real node of that pool."""
    labels = {
        "kubernetes.io/hostname": node["name"],
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": pool["instanceType"],
        "topology.kubernetes.io/region": node["region"],
        "topology.kubernetes.io/zone": node["zone"],
        "type": "kwok",
    }
    capacity = {"cpu": pool["cpu"], "memory": pool["memory"], "pods": pool["pods"]}
    taints: list[dict[str, str]] = []
    gpus = int(pool.get("gpus", 0))
    if gpus:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": pool["gpuProduct"],
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(pool["gpuMemoryMiB"]),
        }
        capacity["nvidia.com/gpu"] = str(gpus)
        taints.append(dict(GPU_TAINT))
    labels |= node.get("labels", {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node["name"],
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def load_nodes(path: Path = NODES_FILE) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    pools = data["pools"]
    return [node_manifest(node, pools[node["pool"]]) for node in data["nodes"]]


def apply_nodes(path: Path = NODES_FILE, timeout: float = 60) -> list[str]:
    nodes = load_nodes(path)
    kubectl(
        "apply",
        "--server-side",
        "--field-manager=tramontane-localcluster",
        # A restart on the kept etcd finds the nodes tainted unreachable by the node lifecycle
        # controller while the cluster was down: the fleet file's taints win (kwok makes the
        # nodes Ready again and the controller lifts its own taints).
        "--force-conflicts",
        "-f",
        "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}),
    )
    names = [node["metadata"]["name"] for node in nodes]
    kubectl(
        "wait", "--for=condition=Ready", f"--timeout={int(timeout)}s", *(f"node/{n}" for n in names)
    )
    return names


IMAGES = ("pause", "operator", "serving")  # what `make images` builds (e2e/images.sh)


def import_images() -> None:
    """Import the images `make images` built (OCI archives) into the node's containerd: a kubelet
    cannot read an archive, and no registry serves them here. An image is imported again when
    its archive changed (the archive's name carries the hash of its inputs). Only the pause image
    is required (every pod's sandbox); the others are imported once `make images` built them."""
    ctr = [
        str(artifact_dirs()["containerd"] / "ctr"),
        f"--address={realnode.containerd_socket(STATE)}",
        "--namespace=k8s.io",
    ]
    listed = subprocess.run(
        [*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True
    )
    present = set(listed.stdout.split())
    record = STATE / "node" / "imported-images.json"
    imported: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    for name in IMAGES:
        archive = Path(
            subprocess.run(
                [str(E2E_DIR / "images.sh"), "path", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        reference = f"docker.io/tramontane/{name}:dev"
        if reference in present and imported.get(reference) == archive.name:
            continue
        if not archive.exists():
            if name == "pause":
                raise ClusterError(f"the pause image is not built ({archive}): run `make images`")
            log(f"{reference} is not built ({archive.name}); `make images` builds it")
            continue
        started = time.monotonic()
        # --local --discard-unpacked-layers: the compressed layers (3.4 GB for serving) are
        # dropped once unpacked into the snapshotter; the CRI needs only the snapshots. Without
        # --base-name, umoci's bare tag would import unnamed.
        base_name = f"--base-name=docker.io/tramontane/{name}"
        command = [*ctr, "images", "import", "--local", "--discard-unpacked-layers", base_name]
        result = subprocess.run(
            [*command, str(archive)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"importing {archive} failed: {result.stderr.strip()}")
        imported[reference] = archive.name
        record.write_text(json.dumps(imported, indent=2) + "\n")
        log(f"imported {reference} into the node's containerd ({time.monotonic() - started:.0f}s)")
