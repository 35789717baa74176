"""Drift of a RayCluster from its render: tolerant of KubeRay's round trip, strict on edits."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tramontane.render.drift import cluster_drift, drift_revert_patch

# A rayClusterConfig as applied and the RayCluster KubeRay made from it, on the real node.
CAPTURED = json.loads(
    (Path(__file__).parent / "data/kuberay-raycluster-roundtrip.json").read_text()
)
RENDERED: dict[str, Any] = CAPTURED["rayClusterConfig"]


def live() -> dict[str, Any]:
    return copy.deepcopy(CAPTURED["raycluster"])


def worker(cluster: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    return spec


def test_kuberays_own_copy_is_no_drift() -> None:
    # Defaults dropped and quantities rewritten by the Go round trip are not edits.
    assert cluster_drift(RENDERED, live()) == []
    assert drift_revert_patch(RENDERED, live()) == []


def test_what_the_autoscaler_changes_is_no_drift() -> None:
    cluster = live()
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["replicas"] = 3
    group["scaleStrategy"] = {"workersToDelete": ["w-1"]}
    assert cluster_drift(RENDERED, cluster) == []


def _image(c: dict[str, Any]) -> None:
    worker(c)["containers"][0]["image"] = "docker.io/attacker/miner:latest"


def _sidecar(c: dict[str, Any]) -> None:
    worker(c)["containers"].append({"name": "exfil", "image": "busybox"})


def _host_network(c: dict[str, Any]) -> None:
    worker(c)["hostNetwork"] = True


def _env(c: dict[str, Any]) -> None:
    worker(c)["containers"][0].setdefault("env", []).append(
        {"name": "HF_HUB_OFFLINE", "value": "0"}
    )


def _host_path(c: dict[str, Any]) -> None:
    worker(c).setdefault("volumes", []).append({"name": "host", "hostPath": {"path": "/"}})


def _group(c: dict[str, Any]) -> None:
    extra = copy.deepcopy(c["spec"]["workerGroupSpecs"][0])
    extra["groupName"] = "smuggled"
    c["spec"]["workerGroupSpecs"].append(extra)


def _head_command(c: dict[str, Any]) -> None:
    c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["command"] = ["sh", "-c", "x"]


def _memory(c: dict[str, Any]) -> None:
    worker(c)["containers"][0]["resources"]["limits"]["memory"] = "64Gi"


def _suspend(c: dict[str, Any]) -> None:
    c["spec"]["suspend"] = True


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (_image, ".spec.workerGroupSpecs[0].template.spec.containers[0].image"),
        (_sidecar, ".spec.workerGroupSpecs[0].template.spec.containers"),
        (_host_network, ".spec.workerGroupSpecs[0].template.spec.hostNetwork"),
        (_env, ".spec.workerGroupSpecs[0].template.spec.containers[0].env"),
        (_host_path, ".spec.workerGroupSpecs[0].template.spec.volumes"),
        (_group, ".spec.workerGroupSpecs[smuggled] added"),
        (_head_command, ".spec.headGroupSpec.template.spec.containers[0].command"),
        (_memory, ".spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory"),
        (_suspend, ".spec.suspend"),
    ],
)
def test_an_edit_is_drift_and_the_patch_puts_the_render_back(
    edit: Callable[[dict[str, Any]], None], where: str
) -> None:
    cluster = live()
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = 2  # the autoscaler's, kept
    edit(cluster)
    assert where in cluster_drift(RENDERED, cluster)
    test, replace = drift_revert_patch(RENDERED, cluster)
    assert test == {"op": "test", "path": "/metadata/resourceVersion",
                    "value": cluster["metadata"]["resourceVersion"]}  # fmt: skip
    assert replace["op"] == "replace" and replace["path"] == "/spec"
    reverted = {**cluster, "spec": replace["value"]}
    assert cluster_drift(RENDERED, reverted) == []
    assert reverted["spec"]["workerGroupSpecs"][0]["replicas"] == 2
