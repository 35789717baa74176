"""Status conditions as the Kubernetes API conventions define them (metav1.Condition)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from tramontane.api.base import ApiModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """The conditions Tramontane writes. `Ready` is the summary (Tenant: its only one)."""

    READY = "Ready"
    RECONCILED = "Reconciled"
    RESIDENCY_COMPLIANT = "ResidencyCompliant"
    AVAILABLE = "Available"
    MODEL_SOURCE_READY = "ModelSourceReady"
    PODS_HEALTHY = "PodsHealthy"
    UPGRADING = "Upgrading"


class Reason(StrEnum):
    """The reasons of the conditions Tramontane writes (a failing pod's condition carries its
    container's own reason instead, e.g. CrashLoopBackOff)."""

    # Reconciled
    APPLIED = "Applied"
    APPLY_FAILED = "ApplyFailed"
    WITHDRAWN = "Withdrawn"
    HELD = "Held"
    # ResidencyCompliant (and the tenancy of a namespace: render.tenant.TenancyError)
    WITHIN_POLICY = "WithinPolicy"
    NO_TENANT = "NoTenant"
    TENANCY_MISMATCH = "TenancyMismatch"
    RESIDENCY_POLICY_NOT_FOUND = "ResidencyPolicyNotFound"
    MODEL_SOURCE_NOT_ALLOWED = "ModelSourceNotAllowed"
    # Available
    REPLICAS_READY = "ReplicasReady"
    RAY_SERVICE_MISSING = "RayServiceMissing"
    WAITING_FOR_RAY_CLUSTER = "WaitingForRayCluster"
    SERVE_APPLICATION_FAILED = "ServeApplicationFailed"
    HEAD_NOT_READY = "HeadNotReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    SERVE_APPLICATION_NOT_RUNNING = "ServeApplicationNotRunning"
    # ModelSourceReady
    CLAIM_BOUND = "ClaimBound"
    CLAIM_NOT_FOUND = "ClaimNotFound"
    CLAIM_NOT_BOUND = "ClaimNotBound"
    FETCHED_BY_ENGINE = "FetchedByEngine"
    # PodsHealthy
    NO_FAILING_PODS = "NoFailingPods"
    # Upgrading
    NEW_CLUSTER_STARTING = "NewClusterStarting"
    NEW_CLUSTER_FAILING = "NewClusterFailing"
    UP_TO_DATE = "UpToDate"
    NOT_SERVING_YET = "NotServingYet"
    # Ready
    READY = "Ready"
    # Tenant Ready
    PROVISIONED = "Provisioned"
    NAMESPACE_TAKEN = "NamespaceTaken"
    QUOTA_PENDING = "QuotaPending"


class EventReason(StrEnum):
    """The reasons of the Kubernetes Events the operator posts."""

    RECONCILE_FAILED = "ReconcileFailed"
    RESIDENCY_VIOLATION = "ResidencyViolation"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"
    READY = "Ready"
    UPGRADE_STARTED = "UpgradeStarted"
    PODS_FAILING = "PodsFailing"
    MODEL_SOURCE_NOT_READY = "ModelSourceNotReady"
    SERVING_CLUSTER_CHANGED = "ServingClusterChanged"
    DRIFT_REVERTED = "DriftReverted"


class Condition(ApiModel):
    """One aspect of the object's current state."""

    type: str = Field(description="Type of condition in CamelCase, e.g. Ready.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="Machine-readable CamelCase reason for the last transition.",
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: datetime = Field(
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int = Field(
        default=0, ge=0, description="metadata.generation the condition was computed from."
    )


def set_condition(
    conditions: list[Condition],
    new: Condition,
) -> list[Condition]:
    """Replace the condition of the same type (or add it).

    lastTransitionTime is kept when the status is unchanged, as the API conventions require.
    """
    result: list[Condition] = []
    replaced = False
    for existing in conditions:
        if existing.type != new.type:
            result.append(existing)
            continue
        replaced = True
        if existing.status == new.status:
            new = new.model_copy(update={"last_transition_time": existing.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result


def find(conditions: list[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == condition_type), None)
