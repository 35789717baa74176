"""The local control plane is made of the real, pinned upstream components and behaves like one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import localcluster
from tests.kube import Kubectl, KubectlError, eventually

RAY_IMAGE = "rayproject/ray:2.60.0"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_components_are_the_pinned_versions(cluster: Kubectl) -> None:
    server = cluster.json("version")["serverVersion"]
    assert server["gitVersion"] == localcluster.versions()["KUBERNETES_VERSION"]
    crd = cluster.json("get", "crd", "rayclusters.ray.io")
    assert any(v["name"] == "v1" and v["served"] for v in crd["spec"]["versions"])
    for kind in ("podmonitors", "servicemonitors", "prometheusrules"):
        cluster.run("get", "crd", f"{kind}.monitoring.coreos.com")


def test_gpu_nodes_look_like_h100_nodes(cluster: Kubectl) -> None:
    nodes = cluster.json("get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert len(nodes) >= 8
    regions = set()
    for node in nodes:
        labels = node["metadata"]["labels"]
        regions.add(labels["topology.kubernetes.io/region"])
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert labels["nvidia.com/gpu.count"] == "8"
        assert labels["node.kubernetes.io/instance-type"]
        assert labels["topology.kubernetes.io/zone"].startswith(
            labels["topology.kubernetes.io/region"]
        )
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready
        assert ready[0]["status"] == "True"
    assert {"eu-west-3", "eu-central-1", "us-east-1"} <= regions


def _raycluster(name: str, namespace: str, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"num-gpus": "0"},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": RAY_IMAGE,
                                "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
                            }
                        ]
                    }
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "h100",
                    "replicas": workers,
                    "minReplicas": 0,
                    "maxReplicas": 8,
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "tolerations": [GPU_TOLERATION],
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": RAY_IMAGE,
                                    "resources": {
                                        "requests": {
                                            "cpu": "8",
                                            "memory": "64Gi",
                                            "nvidia.com/gpu": "1",
                                        },
                                        "limits": {"nvidia.com/gpu": "1"},
                                    },
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def test_kuberay_runs_a_raycluster_on_the_right_nodes_and_gc_removes_it(
    cluster: Kubectl, namespace: str
) -> None:
    cluster.apply(_raycluster("smoke", namespace, workers=3))
    selector = "ray.io/cluster=smoke"

    def running_pods() -> list[dict[str, Any]] | None:
        pods = cluster.json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return pods if len(pods) == 4 and all(_ready(p) for p in pods) else None

    pods = eventually(running_pods, 90, "head + 3 workers Running and Ready")
    nodes = {n["metadata"]["name"]: n for n in cluster.json("get", "nodes")["items"]}
    for pod in pods:
        node_labels = nodes[pod["spec"]["nodeName"]]["metadata"]["labels"]
        if pod["metadata"]["labels"]["ray.io/node-type"] == "head":
            assert "nvidia.com/gpu.present" not in node_labels, "head must land on a CPU node"
        else:
            assert node_labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"

    eventually(
        lambda: (
            cluster.json("get", "raycluster", "smoke", "-n", namespace)
            .get("status", {})
            .get("state")
            == "ready"
        ),
        60,
        "KubeRay to report the RayCluster ready",
    )

    cluster.run("delete", "raycluster", "smoke", "-n", namespace, "--wait=true")
    eventually(
        lambda: not cluster.json("get", "pods", "-n", namespace, "-l", selector)["items"],
        60,
        "garbage collection to remove the Ray pods",
    )


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [
                {
                    "name": "main",
                    "image": RAY_IMAGE,
                    "resources": {
                        "requests": {"nvidia.com/gpu": str(gpus)},
                        "limits": {"nvidia.com/gpu": str(gpus)},
                    },
                }
            ],
        },
    }


def test_gpu_resource_quota_rejects_an_over_quota_pod(cluster: Kubectl, namespace: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "gpus", "namespace": namespace},
        "spec": {"hard": {"requests.nvidia.com/gpu": "2"}},
    }
    cluster.apply(quota)
    # Quota admission refuses pods until the quota controller has computed the quota's usage.
    eventually(
        lambda: (
            cluster.json("get", "resourcequota", "gpus", "-n", namespace)
            .get("status", {})
            .get("hard")
        ),
        30,
        "the quota controller to fill in the quota status",
    )
    cluster.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(_gpu_pod("fits", 2)))
    with pytest.raises(KubectlError) as rejected:
        cluster.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(_gpu_pod("over", 1)))
    assert "exceeded quota: gpus" in rejected.value.stderr
    assert "requests.nvidia.com/gpu" in rejected.value.stderr
    assert "over" not in cluster.run("get", "pods", "-n", namespace, "-o", "name")


def test_service_account_tokens_authenticate_and_rbac_applies(
    cluster: Kubectl, namespace: str, tmp_path: Path
) -> None:
    cluster.run("create", "serviceaccount", "robot", "-n", namespace)
    token = cluster.run("create", "token", "robot", "-n", namespace, "--duration=10m").strip()
    # A kubeconfig holding only the token, as a pod's mounted service account would have.
    admin = cluster.json("config", "view", "--raw", "--minify")
    token_config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "robot", "user": {"token": token}}],
        "contexts": [
            {"name": "robot", "context": {"cluster": admin["clusters"][0]["name"], "user": "robot"}}
        ],
        "current-context": "robot",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(token_config))
    as_robot = Kubectl(tmp_path / "kubeconfig")
    whoami = as_robot.json("auth", "whoami")
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:robot"
    with pytest.raises(KubectlError) as denied:
        as_robot.run("get", "secrets", "-n", namespace)
    assert "Forbidden" in denied.value.stderr


def test_up_is_idempotent_and_replaces_a_dead_component(cluster: Kubectl) -> None:
    before = localcluster.our_processes()
    assert all(len(before[c.name]) == 1 for c in localcluster.COMPONENTS)

    localcluster.up()
    assert localcluster.our_processes() == before, "a second `up` must reuse, not restart"

    # A crashed component (here KWOK, killed without a chance to clean up) is replaced once.
    os.kill(before["kwok"][0], signal.SIGKILL)
    eventually(lambda: not localcluster.component("kwok").healthy(), 10, "KWOK to be down")
    localcluster.up()
    after = localcluster.our_processes()
    assert len(after["kwok"]) == 1
    assert after["kwok"] != before["kwok"]
    assert {c: p for c, p in after.items() if c != "kwok"} == {
        c: p for c, p in before.items() if c != "kwok"
    }
    assert localcluster.healthy()
