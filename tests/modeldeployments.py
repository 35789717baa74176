"""ModelDeployments in the tests: the sample manifest, reading objects and their conditions,
waiting for Ready. Shared by the integration suites (plain module: conftest.py holds fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.kube import Kubectl, eventually

REPO = Path(__file__).resolve().parents[1]


def sample(namespace: str, name: str = "llama-3-8b", **spec_changes: Any) -> dict[str, Any]:
    md: dict[str, Any] = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    md["metadata"] = {"name": name, "namespace": namespace}
    md["spec"].update(spec_changes)
    return md


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = obj.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


def get(cluster: Kubectl, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    out = cluster.run(
        "get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found",
        "--show-managed-fields",
    )  # fmt: skip
    return json.loads(out) if out.strip() else None


def wait_ready(cluster: Kubectl, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        md = get(cluster, "md", namespace, name)
        if md is None or condition(md, "Ready").get("status") != "True":
            return None
        return md if md["status"]["observedGeneration"] == md["metadata"]["generation"] else None

    return eventually(ready, timeout, f"ModelDeployment {namespace}/{name} Ready")
