"""Observed children → ModelDeployment status (pure: the controller passes in what it read)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tramontane.api.conditions import Condition, ConditionStatus, find, set_condition
from tramontane.api.v1alpha1 import ModelDeployment, ModelDeploymentStatus
from tramontane.render.rayservice import RenderOptions, endpoint, pod_selector

RECONCILED = "Reconciled"
RESIDENCY = "ResidencyCompliant"
AVAILABLE = "Available"
READY = "Ready"
_FAILED_APP_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}


@dataclass(frozen=True)
class Observed:
    """What the controller saw of the children after applying them."""

    rayservice: dict[str, Any] | None
    raycluster: dict[str, Any] | None
    apply_error: str | None = None
    # (status, reason, message) of ResidencyCompliant; None: the namespace has no tenant.
    residency: tuple[ConditionStatus, str, str] | None = None


def serving_cluster_name(rayservice: dict[str, Any] | None) -> str | None:
    """The RayCluster that serves (or, before its first success, is being prepared to)."""
    status = (rayservice or {}).get("status", {})
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        name = status.get(key, {}).get("rayClusterName")
        if name:
            return str(name)
    return None


def _failed_applications(rayservice: dict[str, Any] | None) -> list[str]:
    status = (rayservice or {}).get("status", {})
    apps = status.get("activeServiceStatus", {}).get("applicationStatuses", {}) or {}
    return [
        f"{name}: {app.get('status')} {app.get('message', '')}".strip()
        for name, app in apps.items()
        if app.get("status") in _FAILED_APP_STATES
    ]


def _application_not_running(rayservice: dict[str, Any] | None, name: str) -> str | None:
    """Why the Serve application does not serve yet, as KubeRay reports it from the Ray
    dashboard: the serving cluster's status, or the pending one's before the first success
    (during an upgrade the old cluster serves while the new one deploys). None when it is
    RUNNING, or when KubeRay has reported nothing (it has not reached the dashboard)."""
    status = (rayservice or {}).get("status", {})
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        apps = status.get(key, {}).get("applicationStatuses") or {}
        if apps:
            state = (apps.get(name) or {}).get("status", "missing")
            return None if state == "RUNNING" else f"Serve application {name} is {state}"
    return None


def _head_ready(raycluster: dict[str, Any]) -> bool:
    status = raycluster.get("status", {})
    head = find_raw(status.get("conditions", []), "HeadPodReady")
    return status.get("state") == "ready" or (head or {}).get("status") == "True"


def find_raw(conditions: list[dict[str, Any]], condition_type: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == condition_type), None)


Verdict = tuple[bool, str, str]  # (ok, reason, message)


def _condition(md: ModelDeployment, now: datetime, kind: str, verdict: Verdict) -> Condition:
    ok, reason, message = verdict
    return Condition(
        type=kind,
        status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=md.generation,
    )


def _availability(md: ModelDeployment, observed: Observed, ready_replicas: int) -> Verdict:
    """Available: the RayService and its cluster exist, the Serve application runs (once KubeRay
    reports it) and enough serving replicas are ready."""
    raycluster = observed.raycluster
    needed = md.spec.scaling.min_replicas
    failed_apps = _failed_applications(observed.rayservice)
    not_running = _application_not_running(observed.rayservice, md.name)
    available: Verdict
    if observed.rayservice is None:
        available = (False, "RayServiceMissing", f"RayService {md.name} does not exist yet")
    elif raycluster is None:
        available = (False, "WaitingForRayCluster", "KubeRay has not created the RayCluster yet")
    elif failed_apps:
        available = (False, "ServeApplicationFailed", "; ".join(failed_apps))
    elif not _head_ready(raycluster):
        available = (
            False,
            "HeadNotReady",
            f"Ray head of {raycluster['metadata']['name']} is not ready",
        )
    elif ready_replicas < needed:
        available = (
            False, "ReplicasNotReady",
            f"{ready_replicas}/{needed} minimum serving replicas ready "
            f"(RayCluster {raycluster['metadata']['name']})",
        )  # fmt: skip
    elif not_running:
        available = (False, "ServeApplicationNotRunning", not_running)
    else:
        available = (
            True, "ReplicasReady",
            f"{ready_replicas} serving replicas ready (minimum {needed}) in RayCluster "
            f"{raycluster['metadata']['name']}",
        )  # fmt: skip
    return available


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    *,
    previous: ModelDeploymentStatus | None,
    options: RenderOptions,
    now: datetime,
) -> ModelDeploymentStatus:
    conditions = list(previous.conditions) if previous else []

    if observed.apply_error:
        reconciled = _condition(md, now, RECONCILED, (False, "ApplyFailed", observed.apply_error))
    else:
        reconciled = _condition(
            md, now, RECONCILED,
            (True, "Applied", f"RayService {md.name} and PodMonitor {md.name} match the spec"),
        )  # fmt: skip
    conditions = set_condition(conditions, reconciled)
    residency_status, residency_reason, residency_message = observed.residency or (
        ConditionStatus.UNKNOWN, "NoTenant",
        f"namespace {md.namespace} belongs to no Tenant: no residency policy applies",
    )  # fmt: skip
    residency = Condition(
        type=RESIDENCY,
        status=residency_status,
        reason=residency_reason,
        message=residency_message,
        last_transition_time=now,
        observed_generation=md.generation,
    )
    conditions = set_condition(conditions, residency)

    raycluster = observed.raycluster
    status = (raycluster or {}).get("status", {})
    replicas = int(status.get("availableWorkerReplicas", 0))
    ready_replicas = int(status.get("readyWorkerReplicas", 0))
    available = _availability(md, observed, ready_replicas)
    conditions = set_condition(conditions, _condition(md, now, AVAILABLE, available))

    ready: Verdict
    if residency.status is ConditionStatus.FALSE:
        ready = (False, residency.reason, residency.message)
    elif reconciled.status is not ConditionStatus.TRUE:
        ready = (False, reconciled.reason, reconciled.message)
    elif not available[0]:
        ready = (False, available[1], available[2])
    else:
        ready = (True, "Ready", f"serving {md.served_name} at {endpoint(md, options)}")
    conditions = set_condition(conditions, _condition(md, now, READY, ready))

    return ModelDeploymentStatus(
        observed_generation=md.generation,
        conditions=conditions,
        replicas=replicas,
        ready_replicas=ready_replicas,
        endpoint=endpoint(md, options),
        ray_service_name=md.name,
        selector=pod_selector(md),
    )


def transitions(
    before: ModelDeploymentStatus | None, after: ModelDeploymentStatus
) -> list[Condition]:
    """Conditions whose status changed: what deserves a Kubernetes Event."""
    changed = []
    for condition in after.conditions:
        old = find(before.conditions, condition.type) if before else None
        if old is None or old.status != condition.status:
            changed.append(condition)
    return changed
