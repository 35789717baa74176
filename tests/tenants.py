"""Tenants in the integration tests: provisioned Ready with their model store, and removed with
everything in them (plain module: conftest.py holds fixtures)."""

from __future__ import annotations

from typing import Any

from tests.kube import Kubectl, eventually, tenant_manifest
from tests.modeldeployments import condition, get


def provision_tenant(cluster: Kubectl, name: str, policy: str, **kwargs: Any) -> None:
    """A Tenant under `policy`, Ready, with its model claim."""
    cluster.apply(tenant_manifest(name, policy, **kwargs))
    eventually(
        lambda: condition(get(cluster, "tenant", "", name) or {}, "Ready").get("status") == "True",
        30,
        f"Tenant {name} Ready",
    )
    cluster.apply(*model_volume(name))


def remove_tenant(cluster: Kubectl, name: str) -> None:
    cluster.run("delete", "md", "--all", "-n", name, "--wait=true", check=False)
    cluster.run("delete", "tenant", name, "--wait=false", check=False)
    cluster.run("delete", "pv", f"{MODELS_CLAIM}-{name}", "--wait=false", check=False)


MODELS_CLAIM = "models"


def model_volume(namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tenant's model store that `pvc://models/...` URIs name: a PersistentVolumeClaim bound
    to its own PersistentVolume, as a platform team would provision it. The pods mount the claim,
    so without it they would never schedule. (hostPath stands in for the real storage: no
    kubelet mounts anything here.)"""
    pv_name = f"{MODELS_CLAIM}-{namespace}"
    storage = {"requests": {"storage": "100Gi"}}
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "100Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": f"/srv/models/{namespace}"},
            "claimRef": {"namespace": namespace, "name": MODELS_CLAIM},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODELS_CLAIM, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": storage,
        },
    }
    return pv, pvc
