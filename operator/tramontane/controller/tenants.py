"""Reconcile one Tenant: its namespace and guard rails, and a status with its quota use."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from tramontane.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    Reason,
    set_condition,
)
from tramontane.api.labels import TENANT_LABEL
from tramontane.api.tenancy import Tenant, TenantStatus
from tramontane.controller import telemetry
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import NAMESPACE, TENANT, Kube
from tramontane.render.rayservice import FIELD_MANAGER
from tramontane.render.status import Verdict
from tramontane.render.tenant import (
    TenancyError,
    TenantOptions,
    owning_tenant,
    render_tenant,
)

log = logging.getLogger(__name__)
KIND = "Tenant"
tenant_metrics = telemetry.TenantMetrics(KIND)


def users_of(kube: Kube, policy: str) -> list[str]:
    """The Tenants living under ResidencyPolicy `policy`, from the API (the policy-deletion
    webhook; handlers use indexes.policy_users). One being deleted no longer does: its
    namespace is going, and nothing new can be created in a terminating namespace."""
    return [
        item["metadata"]["name"]
        for item in kube.list_all(TENANT)
        if (item.get("spec") or {}).get("residencyPolicy") == policy
        and not item["metadata"].get("deletionTimestamp")
    ]


def labels_drifted(namespace: dict[str, Any], tenant: Tenant) -> bool:
    """Whether the namespace a Tenant claims lost the labels that make it the owner (the rule is
    owning_tenant's)."""
    labels = namespace.get("metadata", {}).get("labels") or {}
    try:
        owning_tenant(tenant.spec.namespace, labels, [tenant])
    except TenancyError:
        return True
    return False


def _ours(namespace: dict[str, Any], tenant: Tenant) -> bool:
    """A namespace this Tenant made: the Tenant is its controller owner (set when the operator
    created it; labels can be edited, and a label alone would let anyone who can label a
    namespace hand it to a tenant). Never adopt one we did not create: deleting the Tenant
    would delete it."""
    uid = tenant.metadata.get("uid")
    return any(
        ref.get("controller") and ref.get("kind") == Tenant.KIND and ref.get("uid") == uid
        for ref in namespace.get("metadata", {}).get("ownerReferences") or []
    )


def _quota_computed(quota: dict[str, Any]) -> bool:
    """Whether quota admission can evaluate this quota: the quota controller has recorded usage for
    every resource it limits (for a freshly installed CRD that takes a discovery resync)."""
    hard = quota.get("spec", {}).get("hard", {})
    status = quota.get("status", {})
    used = status.get("used") or {}
    return status.get("hard") == hard and all(resource in used for resource in hard)


def _provision(tenant: Tenant, kube: Kube, options: TenantOptions, facts: Facts) -> Verdict:
    """Apply the tenant's objects if it can be done safely; say what happened."""
    policy = facts.policy_of(tenant)
    if policy is None:
        return Verdict(
            False,
            Reason.RESIDENCY_POLICY_NOT_FOUND,
            f"ResidencyPolicy {tenant.spec.residency_policy} does not exist",
        )
    existing = kube.get(NAMESPACE, None, tenant.spec.namespace)
    owner = ((existing or {}).get("metadata", {}).get("labels") or {}).get(TENANT_LABEL)
    if existing is not None and not _ours(existing, tenant):
        whose = f"tenant {owner}" if owner else "no tenant"
        message = f"namespace {tenant.spec.namespace} already exists and belongs to {whose}"
        return Verdict(False, Reason.NAMESPACE_TAKEN, message)
    quota_computed = True
    upgrade_gpus = max((deployment.gpus for deployment in facts.deployments), default=0)
    for manifest in render_tenant(tenant, policy, options, upgrade_gpus):
        applied = kube.apply(manifest, FIELD_MANAGER)
        if manifest["kind"] == "ResourceQuota":
            quota_computed = _quota_computed(applied)
    if not quota_computed:
        # Quota admission refuses every ModelDeployment until the quota controller has computed
        # the quota's usage; the quota's status update brings us back here.
        return Verdict(
            False,
            Reason.QUOTA_PENDING,
            f"waiting for the ResourceQuota of namespace {tenant.spec.namespace} to be "
            "computed by the quota controller",
        )
    return Verdict(
        True,
        Reason.PROVISIONED,
        f"namespace {tenant.spec.namespace} with quota, limits, network policies and RBAC "
        f"under residency policy {policy.name} ({policy.spec.jurisdiction})",
    )


def reconcile_tenant(
    kube: Kube, body: dict[str, Any], options: TenantOptions, facts: Facts
) -> None:
    """`facts`: the tenant namespace's, with its deployments (indexes.Facts)."""
    if body["metadata"].get("deletionTimestamp"):
        return
    tenant = Tenant.from_body(body)
    with telemetry.tracer.start_as_current_span(
        "reconcile Tenant", attributes={"tramontane.tenant": tenant.name}
    ):
        result = "success"
        try:
            counted = int((body.get("status") or {}).get("modelDeployments") or 0)
            if facts.policy_of(tenant) is None or len(facts.deployments) < counted:
                # Not in the indexes is not absent: a replica resumed after a peering pause
                # reconciles while kopf lists every kind again. A missing policy would be
                # reported, and missing deployments would shrink the quota's room for an
                # upgrade: both are confirmed from the API first.
                facts = Facts.from_api(kube, tenant.spec.namespace, with_regions=False)
            verdict = _provision(tenant, kube, options, facts)
        except ApiException as error:
            result = "error"
            verdict = Verdict(False, Reason.APPLY_FAILED, f"{error.status} {error.reason}")
            log.warning("tenant %s: apply failed: %s", tenant.name, error.body)
        # Counted once the namespace is known to be ours.
        deployments = facts.deployments if verdict.ok else ()
        previous_raw = body.get("status") or {}
        previous = TenantStatus.model_validate(previous_raw) if previous_raw else None
        ready = Condition(
            type=ConditionType.READY,
            status=ConditionStatus.TRUE if verdict.ok else ConditionStatus.FALSE,
            reason=verdict.reason,
            message=verdict.message,
            last_transition_time=datetime.now(UTC).replace(microsecond=0),
            observed_generation=int(body["metadata"].get("generation", 0)),
        )
        status = TenantStatus(
            observed_generation=int(body["metadata"].get("generation", 0)),
            conditions=set_condition(list(previous.conditions) if previous else [], ready),
            gpus_in_use=sum(deployment.gpus for deployment in deployments),
            model_deployments=len(deployments),
        )
        if previous is None or previous.to_wire() != status.to_wire():
            try:
                kube.patch_status(TENANT, None, tenant.name, status.to_wire())
            except ApiException as error:
                if error.status != 404:
                    raise
                return  # deleted meanwhile (its namespace goes with it): nothing to report on
        tenant_metrics.update(tenant.name, {ConditionType.READY: ready.status.value})
        tenant_metrics.quota(
            tenant.name,
            gpus=tenant.spec.quota.gpus,
            gpus_requested=status.gpus_in_use,
            deployments=tenant.spec.quota.model_deployments,
            deployments_in_use=status.model_deployments,
        )
        telemetry.RECONCILES.labels(KIND, result).inc()
