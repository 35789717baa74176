"""Observed children → ModelDeployment status (pure: the controller passes in what it read)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from tramontane.api.conditions import (
    Condition,
    ConditionStatus,
    ConditionType,
    Reason,
    find,
    set_condition,
)
from tramontane.api.v1alpha1 import ModelDeployment, ModelDeploymentStatus
from tramontane.render.rayservice import RenderOptions, endpoint, pod_selector

_FAILED_APP_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}
# KubeRay's RayCluster condition that its head pod is ready.
HEAD_POD_READY = "HeadPodReady"
# Container waiting reasons that do not resolve by waiting: the pod needs a fix (image, args,
# config, memory). ContainerCreating and PodInitializing are normal steps and are not listed.
FAILING_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# A condition message is read on a terminal: a Serve traceback is cut to its last lines.
MESSAGE_LIMIT = 1024


def brief(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The end of a long message (a traceback's last lines say what failed)."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


@dataclass(frozen=True)
class ClaimState:
    """A PersistentVolumeClaim named by a pvc:// source, as observed (None: it does not exist)."""

    name: str
    phase: str | None


@dataclass(frozen=True)
class PodProblem:
    """A serving pod that will not become ready by itself, with its container's reason."""

    pod: str
    reason: str
    message: str


def pod_problem(pod: dict[str, Any]) -> PodProblem | None:
    """Why a Ray pod is failing (a crash loop, an image that cannot be pulled, a bad config),
    from its container statuses; None for a pod that is fine or still starting."""
    name = str(pod.get("metadata", {}).get("name", "?"))
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        failure = str(status.get("reason") or "PodFailed")
        return PodProblem(name, failure, f"pod {name} failed: {status.get('message', failure)}")
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    for container in statuses:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason not in FAILING_WAITING_REASONS:
            continue
        message = f"pod {name} container {container.get('name')}: {reason}"
        last = (container.get("lastState") or {}).get("terminated") or {}
        if last:
            message += (
                f", last exit code {last.get('exitCode')} ({last.get('reason', 'Error')}),"
                f" {container.get('restartCount', 0)} restarts"
            )
        if waiting.get("message"):
            message += f": {waiting['message']}"
        return PodProblem(name, str(reason), brief(message, 512))
    return None


class Verdict(NamedTuple):
    """A condition's outcome: whether it holds, why (a Reason, or a failing container's own
    reason) and the details."""

    ok: bool
    reason: str
    message: str


class ResidencyVerdict(NamedTuple):
    """ResidencyCompliant as reconcile decided it (Unknown: the tenancy is in doubt)."""

    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the controller saw of the children after applying them."""

    rayservice: dict[str, Any] | None
    raycluster: dict[str, Any] | None
    apply_error: str | None = None
    # None: the namespace has no tenant.
    residency: ResidencyVerdict | None = None
    # The claims named by pvc:// sources; sources of other schemes are fetched by the engine.
    claims: tuple[ClaimState, ...] = ()
    # Serving pods that fail (see pod_problem), in name order.
    pod_problems: tuple[PodProblem, ...] = ()


def serving_cluster_name(rayservice: dict[str, Any] | None) -> str | None:
    """The RayCluster that serves (or, before its first success, is being prepared to)."""
    status = (rayservice or {}).get("status", {})
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        name = status.get(key, {}).get("rayClusterName")
        if name:
            return str(name)
    return None


def _failed_applications(rayservice: dict[str, Any] | None, key: str) -> list[str]:
    """The failed Serve applications of the active or the pending cluster (`key`), with
    KubeRay's message (a traceback's end)."""
    status = (rayservice or {}).get("status", {})
    apps = status.get(key, {}).get("applicationStatuses", {}) or {}
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
    head = find_raw(status.get("conditions", []), HEAD_POD_READY)
    return status.get("state") == "ready" or (head or {}).get("status") == ConditionStatus.TRUE


def find_raw(conditions: list[dict[str, Any]], condition_type: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == condition_type), None)


def _condition(
    md: ModelDeployment, now: datetime, kind: ConditionType, verdict: Verdict
) -> Condition:
    return Condition(
        type=kind,
        status=ConditionStatus.TRUE if verdict.ok else ConditionStatus.FALSE,
        reason=verdict.reason,
        message=verdict.message,
        last_transition_time=now,
        observed_generation=md.generation,
    )


def _availability(md: ModelDeployment, observed: Observed, ready_replicas: int) -> Verdict:
    """Available: the RayService and its cluster exist, the Serve application runs (once KubeRay
    reports it) and enough serving replicas are ready."""
    raycluster = observed.raycluster
    needed = md.spec.scaling.min_replicas
    status = (observed.rayservice or {}).get("status", {})
    # Before the first success the pending cluster is the one being prepared to serve.
    serving_key = (
        "activeServiceStatus"
        if status.get("activeServiceStatus", {}).get("rayClusterName")
        else "pendingServiceStatus"
    )
    failed_apps = _failed_applications(observed.rayservice, serving_key)
    not_running = _application_not_running(observed.rayservice, md.name)
    available: Verdict
    if observed.rayservice is None:
        available = Verdict(
            False, Reason.RAY_SERVICE_MISSING, f"RayService {md.name} does not exist yet"
        )
    elif raycluster is None:
        available = Verdict(
            False, Reason.WAITING_FOR_RAY_CLUSTER, "KubeRay has not created the RayCluster yet"
        )
    elif failed_apps:
        available = Verdict(False, Reason.SERVE_APPLICATION_FAILED, brief("; ".join(failed_apps)))
    elif not _head_ready(raycluster):
        available = Verdict(
            False,
            Reason.HEAD_NOT_READY,
            f"Ray head of {raycluster['metadata']['name']} is not ready",
        )
    elif ready_replicas < needed:
        available = Verdict(
            False, Reason.REPLICAS_NOT_READY,
            f"{ready_replicas}/{needed} minimum serving replicas ready "
            f"(RayCluster {raycluster['metadata']['name']})",
        )  # fmt: skip
    elif not_running:
        available = Verdict(False, Reason.SERVE_APPLICATION_NOT_RUNNING, not_running)
    else:
        available = Verdict(
            True, Reason.REPLICAS_READY,
            f"{ready_replicas} serving replicas ready (minimum {needed}) in RayCluster "
            f"{raycluster['metadata']['name']}",
        )  # fmt: skip
    return available


def _model_source(md: ModelDeployment, claims: tuple[ClaimState, ...]) -> Verdict:
    """ModelSourceReady: every claim a pvc:// source names exists and is bound. Sources of other
    schemes (s3, gs, hf) are fetched by the engine when it starts: the operator cannot see them."""
    missing = [claim.name for claim in claims if claim.phase is None]
    if missing:
        return Verdict(
            False,
            Reason.CLAIM_NOT_FOUND,
            f"PersistentVolumeClaim {', '.join(missing)} named by the model sources "
            f"does not exist in namespace {md.namespace}",
        )
    unbound = [f"{claim.name} ({claim.phase})" for claim in claims if claim.phase != "Bound"]
    if unbound:
        return Verdict(
            False,
            Reason.CLAIM_NOT_BOUND,
            f"PersistentVolumeClaim {', '.join(unbound)} is not bound to a volume",
        )
    if claims:
        return Verdict(
            True,
            Reason.CLAIM_BOUND,
            f"PersistentVolumeClaim {', '.join(c.name for c in claims)} bound",
        )
    return Verdict(
        True,
        Reason.FETCHED_BY_ENGINE,
        f"{md.spec.model.uri} is fetched by the engine when it starts",
    )


def _upgrading(rayservice: dict[str, Any] | None) -> Verdict:
    """An engine change makes KubeRay start a new cluster beside the serving one (NewCluster
    upgrade); the Service moves to it once its Serve application runs."""
    status = (rayservice or {}).get("status", {})
    active = status.get("activeServiceStatus", {}).get("rayClusterName")
    pending = status.get("pendingServiceStatus", {}).get("rayClusterName")
    failed = _failed_applications(rayservice, "pendingServiceStatus")
    if active and pending and failed:
        return Verdict(True, Reason.NEW_CLUSTER_FAILING,
                       brief(f"RayCluster {pending} fails with the changed engine configuration "
                             f"({active} still serves): {'; '.join(failed)}"))  # fmt: skip
    if active and pending:
        return Verdict(True, Reason.NEW_CLUSTER_STARTING,
                       f"RayCluster {pending} is starting with the changed engine configuration; "
                       f"{active} serves until it runs")  # fmt: skip
    if active:
        return Verdict(
            False, Reason.UP_TO_DATE, f"RayCluster {active} serves the current engine configuration"
        )
    return Verdict(False, Reason.NOT_SERVING_YET, "no RayCluster serves yet")


def _pods_healthy(problems: tuple[PodProblem, ...]) -> Verdict:
    if not problems:
        return Verdict(True, Reason.NO_FAILING_PODS, "no serving pod is failing")
    # The first failing pod's container reason (CrashLoopBackOff, ImagePullBackOff…) says what
    # kind of fix is needed; the message lists every failing pod.
    return Verdict(False, problems[0].reason, brief("; ".join(p.message for p in problems)))


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    *,
    previous: ModelDeploymentStatus | None,
    options: RenderOptions,
    now: datetime,
) -> ModelDeploymentStatus:
    conditions = list(previous.conditions) if previous else []

    residency_verdict = observed.residency or ResidencyVerdict(
        ConditionStatus.UNKNOWN, Reason.NO_TENANT,
        f"namespace {md.namespace} belongs to no Tenant: no residency policy applies",
    )  # fmt: skip
    if observed.apply_error:
        reconciled_verdict = Verdict(False, Reason.APPLY_FAILED, observed.apply_error)
    elif observed.residency and observed.residency.status is ConditionStatus.FALSE:
        # Nothing was applied: the operator removed what ran, so the spec is not served.
        reconciled_verdict = Verdict(
            False, Reason.WITHDRAWN,
            f"RayService {md.name} withdrawn, nothing runs: "
            f"ResidencyCompliant is False ({observed.residency.reason})",
        )  # fmt: skip
    elif observed.residency and observed.residency.status is ConditionStatus.UNKNOWN:
        reconciled_verdict = Verdict(
            False, Reason.HELD,
            f"nothing applied while the tenancy is in doubt: {observed.residency.message}",
        )  # fmt: skip
    else:
        reconciled_verdict = Verdict(
            True, Reason.APPLIED,
            f"RayService {md.name} and PodMonitor {md.name} match the spec",
        )  # fmt: skip
    reconciled = _condition(md, now, ConditionType.RECONCILED, reconciled_verdict)
    conditions = set_condition(conditions, reconciled)
    residency = Condition(
        type=ConditionType.RESIDENCY_COMPLIANT,
        status=residency_verdict.status,
        reason=residency_verdict.reason,
        message=residency_verdict.message,
        last_transition_time=now,
        observed_generation=md.generation,
    )
    conditions = set_condition(conditions, residency)

    raycluster = observed.raycluster
    status = (raycluster or {}).get("status", {})
    replicas = int(status.get("availableWorkerReplicas", 0))
    ready_replicas = int(status.get("readyWorkerReplicas", 0))
    available = _availability(md, observed, ready_replicas)
    model_source = _model_source(md, observed.claims)
    pods_healthy = _pods_healthy(observed.pod_problems)
    upgrading = _upgrading(observed.rayservice)
    for kind, verdict in (
        (ConditionType.AVAILABLE, available),
        (ConditionType.MODEL_SOURCE_READY, model_source),
        (ConditionType.PODS_HEALTHY, pods_healthy),
        (ConditionType.UPGRADING, upgrading),
    ):
        conditions = set_condition(conditions, _condition(md, now, kind, verdict))

    ready: Verdict
    if residency.status is ConditionStatus.FALSE:
        ready = Verdict(False, residency.reason, residency.message)
    elif reconciled.status is not ConditionStatus.TRUE:
        ready = Verdict(False, reconciled.reason, reconciled.message)
    elif not model_source.ok:
        ready = model_source
    elif not available.ok and not pods_healthy.ok:
        ready = pods_healthy  # why it is unavailable: the container's own reason
    elif not available.ok:
        ready = available
    else:
        ready = Verdict(True, Reason.READY, f"serving {md.served_name} at {endpoint(md, options)}")
    conditions = set_condition(conditions, _condition(md, now, ConditionType.READY, ready))

    return ModelDeploymentStatus(
        observed_generation=md.generation,
        conditions=conditions,
        replicas=replicas,
        ready_replicas=ready_replicas,
        endpoint=endpoint(md, options),
        ray_service_name=md.name,
        ray_cluster_name=serving_cluster_name(observed.rayservice),
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
