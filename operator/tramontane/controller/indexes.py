"""What the operator knows of the cluster between API calls: kopf indexes fed by its watches.

kopf lists every indexed kind and fills these indexes before any handler runs, and keeps them
current from the same watch streams that trigger the handlers. Admission and reconciles read
them instead of asking the API server: the webhook's steady state makes no API call at all (see
admission.py and docs/controller.md).

Index functions run on kopf's event loop and so do the readers (`Facts.gather`): handlers take a
snapshot of plain values on the loop and hand that to the threads that call the API.

Two limits of kopf's indexes, and how we live with them:
- They lag the API by a watch event (milliseconds). What admission lets through in that window
  is covered by what the deciding replica counts as admitted in flight (admission.InFlight).
- An object deleted while the replica was paused (peering standby) stays in them after kopf
  lists again (kopf adds what it lists, and removes only on DELETED events). A stale entry can
  only make us refuse (a quota counted twice, a second claimant for a namespace), never admit,
  so a refusal is confirmed from the API before it is given (admission.py).
- kopf holds handlers until every kind is listed only the first time. A replica once active
  that resumes after a pause reconciles while the other kinds are listed again, so objects
  created meanwhile may be missing. A missing object too can only make us hold or withdraw:
  reconciles confirm such verdicts from the API (Facts.from_api) before acting on them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import kopf
from pydantic import ValidationError

from tramontane.api.conditions import ConditionStatus, ConditionType, Reason
from tramontane.api.labels import GPU_PRODUCT_LABEL, LAST_APPLIED_ANNOTATION, REGION_LABEL
from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import AcceleratorType, ModelDeployment
from tramontane.controller.kube import (
    MODELDEPLOYMENT,
    NAMESPACE,
    NODES,
    RESIDENCYPOLICY,
    TENANT,
    Kube,
)
from tramontane.policy.residency import gpus_at_max_scale
from tramontane.render.rayservice import GPU_PRODUCTS, model_claims
from tramontane.render.tenant import TenancyError, owning_tenant

log = logging.getLogger(__name__)


class DeploymentFacts(NamedTuple):
    """A ModelDeployment as quota and claims need it (a thousand full bodies would cost
    megabytes)."""

    name: str
    gpus: int
    claims: tuple[str, ...]


class NamespaceFacts(NamedTuple):
    labels: Mapping[str, str]
    terminating: bool


def _trimmed_metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        key: meta[key]
        for key in ("name", "namespace", "uid", "generation", "deletionTimestamp")
        if key in meta
    }


def deployment_facts(body: Mapping[str, Any]) -> DeploymentFacts:
    name = str(body["metadata"]["name"])
    try:
        md = ModelDeployment.from_body(dict(body))
    except ValidationError:
        # One the webhook never saw (made before it was installed): it counts at what its raw
        # fields say, so quota stays a bound even for objects the models refuse.
        spec = body.get("spec") or {}
        gpus = int((spec.get("scaling") or {}).get("maxReplicas") or 1) * int(
            (spec.get("accelerator") or {}).get("count") or 0
        )
        return DeploymentFacts(name, gpus, ())
    return DeploymentFacts(name, gpus_at_max_scale(md), tuple(model_claims(md)))


@kopf.index("tramontane.dev", "v1alpha1", "modeldeployments")
def deployments(body: kopf.Body, namespace: str | None, **_: Any) -> dict[str, DeploymentFacts]:
    """The ModelDeployments of each namespace."""
    return {namespace or "": deployment_facts(body)}


@kopf.index("tramontane.dev", "v1alpha1", "modeldeployments")
def modeldeployment_bodies(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str, str], str]:
    """Each ModelDeployment as the watch last showed it, what a reconcile reads (no managed
    fields, no last-applied annotation): reconciles triggered by a child need no GET. Kept as
    JSON text: a thousand bodies as Python dicts cost about 30 MB, as text a tenth of that."""
    meta = body.get("metadata", {})
    annotations = {
        key: value for key, value in (meta.get("annotations") or {}).items()
        if key != LAST_APPLIED_ANNOTATION
    }  # fmt: skip
    trimmed_meta = {key: value for key, value in meta.items() if key != "managedFields"}
    trimmed_meta["annotations"] = annotations
    trimmed: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": trimmed_meta,
        "spec": dict(body.get("spec") or {}),
    }
    if body.get("status"):
        trimmed["status"] = dict(body["status"])
    return {(namespace or "", name): json.dumps(trimmed, separators=(",", ":"))}


def deployment_body(indexes: Mapping[str, Any], namespace: str, name: str) -> dict[str, Any] | None:
    found = indexes["modeldeployment_bodies"].get((namespace, name))
    text = _one(found) if found else None
    return dict(json.loads(text)) if text else None


@kopf.index("tramontane.dev", "v1alpha1", "tenants")
def tenants_by_namespace(body: kopf.Body, **_: Any) -> dict[str, Tenant] | None:
    """Tenants by the namespace they claim (one, or more when the later ones are
    NamespaceTaken)."""
    try:
        tenant = Tenant.model_validate(
            {"metadata": _trimmed_metadata(body), "spec": body.get("spec", {})}
        )
    except ValidationError:
        return None
    return {tenant.spec.namespace: tenant}


@kopf.index("tramontane.dev", "v1alpha1", "tenants")
def tenants_ready(body: kopf.Body, name: str, **_: Any) -> dict[str, bool]:
    """Whether each Tenant's status says Ready (its quota computed among the rest)."""
    conditions = (body.get("status") or {}).get("conditions") or []
    ready = any(
        c.get("type") == ConditionType.READY and c.get("status") == ConditionStatus.TRUE
        for c in conditions
    )
    return {name: ready}


@kopf.index("tramontane.dev", "v1alpha1", "residencypolicies")
def policies(body: kopf.Body, name: str, **_: Any) -> dict[str, ResidencyPolicy] | None:
    try:
        policy = ResidencyPolicy.model_validate(
            {"metadata": _trimmed_metadata(body), "spec": body.get("spec", {})}
        )
    except ValidationError:
        return None
    return {name: policy}


@kopf.index("", "v1", "namespaces")
def namespaces(body: kopf.Body, name: str, **_: Any) -> dict[str, NamespaceFacts]:
    meta = body.get("metadata", {})
    return {
        name: NamespaceFacts(dict(meta.get("labels") or {}), bool(meta.get("deletionTimestamp")))
    }


def node_pair(body: Mapping[str, Any]) -> tuple[str, str]:
    labels = body.get("metadata", {}).get("labels") or {}
    return (str(labels.get(GPU_PRODUCT_LABEL, "")), str(labels.get(REGION_LABEL, "")))


@kopf.index("", "v1", "nodes")
def node_regions(body: kopf.Body, **_: Any) -> dict[tuple[str, str], None]:
    """(GPU product, region) of every node: is there an accelerator of a type in a region?"""
    return {node_pair(body): None}


def regions_by_accelerator(pairs: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """The regions with nodes of each accelerator type, from (GPU product, region) pairs."""
    pairs = list(pairs)
    return {
        accelerator.value: frozenset(
            region
            for product, region in pairs
            if accelerator is AcceleratorType.CPU or product in GPU_PRODUCTS[accelerator]
        )
        for accelerator in AcceleratorType
    }


def _one(store: Iterable[Any] | None) -> Any:
    return next(iter(store), None) if store is not None else None


@dataclass(frozen=True)
class Facts:
    """One namespace's tenancy as the indexes show it, taken on kopf's loop: plain values that
    threads may read."""

    namespace: str
    labels: Mapping[str, str] | None  # None: no such namespace
    claimants: tuple[Tenant, ...]
    policies: Mapping[str, ResidencyPolicy]
    deployments: tuple[DeploymentFacts, ...] = ()
    regions: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def gather(
        cls,
        namespace: str,
        indexes: Mapping[str, Any],
        *,
        with_deployments: bool = False,
        with_regions: bool = False,
    ) -> Facts:
        """Read from the handler's kwargs (kopf passes every index by its function's name)."""
        facts = _one(indexes["namespaces"].get(namespace))
        claimants = tuple(indexes["tenants_by_namespace"].get(namespace, ()))
        wanted = {tenant.spec.residency_policy for tenant in claimants}
        found = {name: _one(indexes["policies"].get(name)) for name in wanted}
        regions = regions_by_accelerator(indexes["node_regions"]) if with_regions else {}
        return cls(
            namespace=namespace,
            labels=None if facts is None or facts.terminating else facts.labels,
            claimants=claimants,
            policies={name: policy for name, policy in found.items() if policy is not None},
            deployments=tuple(indexes["deployments"].get(namespace, ()))
            if with_deployments
            else (),
            regions=regions,
        )

    @classmethod
    def from_api(
        cls,
        kube: Kube,
        namespace: str,
        *,
        with_deployments: bool = True,
        with_regions: bool = True,
    ) -> Facts:
        """What the indexes would say, read from the API: for a replica whose indexes are not
        current (a peering standby: kopf pauses its watches), and to confirm a refusal or a
        withdrawal that the indexes alone would decide (see the module's docstring)."""
        body = kube.get(NAMESPACE, None, namespace)
        meta = (body or {}).get("metadata", {})
        going = body is None or meta.get("deletionTimestamp")
        claimants = tuple(
            Tenant.from_body(item)
            for item in kube.list_all(TENANT)
            if (item.get("spec") or {}).get("namespace") == namespace
        )
        found: dict[str, ResidencyPolicy] = {}
        for name in {tenant.spec.residency_policy for tenant in claimants}:
            if policy := kube.get(RESIDENCYPOLICY, None, name):
                found[name] = ResidencyPolicy.from_body(policy)
        listed = (
            kube.list_all(MODELDEPLOYMENT, namespace)
            if with_deployments and body is not None
            else []
        )
        nodes = kube.list_all(NODES) if with_regions else []
        return cls(
            namespace=namespace,
            labels=None if going else meta.get("labels") or {},
            claimants=claimants,
            policies=found,
            deployments=tuple(deployment_facts(item) for item in listed),
            regions=regions_by_accelerator(node_pair(n) for n in nodes) if with_regions else {},
        )

    def owner(self) -> Tenant:
        """The Tenant that owns the namespace (render.tenant.owning_tenant's rule)."""
        if self.labels is None:
            raise TenancyError(Reason.NO_TENANT, f"namespace {self.namespace} does not exist")
        return owning_tenant(self.namespace, self.labels, self.claimants)

    def policy_of(self, tenant: Tenant) -> ResidencyPolicy | None:
        return self.policies.get(tenant.spec.residency_policy)


def policy_users(indexes: Mapping[str, Any], policy: str) -> list[str]:
    """The Tenants living under `policy` (one being deleted no longer does: its namespace is
    going, and nothing new can be created in a terminating namespace)."""
    return sorted(
        tenant.name
        for store in indexes["tenants_by_namespace"].values()
        for tenant in store
        if tenant.spec.residency_policy == policy and not tenant.metadata.get("deletionTimestamp")
    )


def tenants_of(indexes: Mapping[str, Any], namespace: str) -> list[Tenant]:
    return list(indexes["tenants_by_namespace"].get(namespace, ()))


def tenant_is_ready(indexes: Mapping[str, Any], name: str) -> bool:
    return bool(_one(indexes["tenants_ready"].get(name)))
