"""The declared node set gives the cluster what scheduling and residency tests need."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

import localcluster

EU_REGIONS = {"eu-west-3", "eu-central-1"}


def test_node_set_spans_jurisdictions_with_gpu_and_cpu_nodes() -> None:
    nodes = localcluster.load_nodes()
    gpu = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
    cpu = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["capacity"]]
    regions = Counter(n["metadata"]["labels"]["topology.kubernetes.io/region"] for n in gpu)
    assert len(gpu) >= 8
    assert len(regions) >= 3
    assert set(regions) >= EU_REGIONS
    assert set(regions) - EU_REGIONS, "at least one GPU region outside the EU"
    cpu_regions = {n["metadata"]["labels"]["topology.kubernetes.io/region"] for n in cpu}
    assert cpu_regions >= EU_REGIONS, "a CPU node for Ray heads in each EU region"
    assert len({n["metadata"]["name"] for n in nodes}) == len(nodes), "node names are unique"


def test_gpu_node_manifest_carries_h100_labels_capacity_and_taint() -> None:
    pool = {
        "instanceType": "p5.48xlarge",
        "cpu": "192",
        "memory": "2048Gi",
        "pods": "110",
        "gpus": 8,
        "gpuProduct": "NVIDIA-H100-80GB-HBM3",
        "gpuMemoryMiB": 81559,
    }
    node = localcluster.node_manifest(
        {"name": "n1", "region": "eu-west-3", "zone": "eu-west-3a"}, pool
    )
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["topology.kubernetes.io/region"] == "eu-west-3"
    assert labels["topology.kubernetes.io/zone"] == "eu-west-3a"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]


def test_cpu_node_manifest_has_no_gpu_and_no_taint() -> None:
    pool = {"instanceType": "m7i.8xlarge", "cpu": "32", "memory": "128Gi", "pods": "110"}
    node = localcluster.node_manifest(
        {"name": "c1", "region": "eu-west-3", "zone": "eu-west-3a"}, pool
    )
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert node["spec"]["taints"] == []
    assert "nvidia.com/gpu.product" not in node["metadata"]["labels"]


def test_extra_node_file_in_the_same_format_loads(tmp_path: Path) -> None:
    extra = {
        "pools": {"l40s": {"instanceType": "g6e.xlarge", "cpu": "4", "memory": "32Gi",
                           "pods": "110", "gpus": 1, "gpuProduct": "NVIDIA-L40S",
                           "gpuMemoryMiB": 46068}},
        "nodes": [{"name": "l40s-1", "pool": "l40s", "region": "eu-north-1",
                   "zone": "eu-north-1a", "labels": {"team": "research"}}],
    }  # fmt: skip
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(extra))
    (node,) = localcluster.load_nodes(path)
    assert node["metadata"]["labels"]["team"] == "research"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "1"
