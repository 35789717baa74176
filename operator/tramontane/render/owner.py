"""The owner reference every child carries (pure)."""

from __future__ import annotations

from typing import Any

from tramontane.api.base import API_VERSION
from tramontane.api.tenancy import Tenant
from tramontane.api.v1alpha1 import ModelDeployment


def owner_reference(owner: ModelDeployment | Tenant) -> dict[str, Any]:
    """`owner` as its children's controller: garbage collection deletes them with it, and
    deletion in the foreground waits for them."""
    return {
        "apiVersion": API_VERSION,
        "kind": owner.KIND,
        "name": owner.name,
        "uid": owner.metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
