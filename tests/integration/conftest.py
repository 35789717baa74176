"""Fixtures of the integration tests (the cluster, CRDs and operator are tests/conftest.py's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kubectl, tenant_manifest
from tests.operator_process import OperatorProcess

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the local cluster: mark it as a group."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def tenant_namespace(operator: OperatorProcess, crds: Kubectl) -> Iterator[str]:
    """A fresh namespace of an unrestricted Tenant (ModelDeployments live only in tenants')."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    crds.run("apply", "-f", str(HERE.parent.parent / "policies/presets/unrestricted.yaml"))
    crds.apply(tenant_manifest(name, "unrestricted", gpus=512, deployments=100))
    crds.run("wait", f"tenant/{name}", "--for=condition=Ready", "--timeout=60s")
    yield name
    # Deployments first: the webhook refuses to delete a Tenant that still has some.
    crds.run("delete", "md", "--all", "-n", name, "--wait=true", check=False)
    crds.run("delete", "tenant", name, "--wait=false", check=False)
