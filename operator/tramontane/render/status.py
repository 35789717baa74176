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
MODEL_SOURCE = "ModelSourceReady"
PODS_HEALTHY = "PodsHealthy"
UPGRADING = "Upgrading"
_FAILED_APP_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}
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


@dataclass(frozen=True)
class Observed:
    """What the controller saw of the children after applying them."""

    rayservice: dict[str, Any] | None
    raycluster: dict[str, Any] | None
    apply_error: str | None = None
    # (status, reason, message) of ResidencyCompliant; None: the namespace has no tenant.
    residency: tuple[ConditionStatus, str, str] | None = None
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
        available = (False, "RayServiceMissing", f"RayService {md.name} does not exist yet")
    elif raycluster is None:
        available = (False, "WaitingForRayCluster", "KubeRay has not created the RayCluster yet")
    elif failed_apps:
        available = (False, "ServeApplicationFailed", brief("; ".join(failed_apps)))
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


def _model_source(md: ModelDeployment, claims: tuple[ClaimState, ...]) -> Verdict:
    """ModelSourceReady: every claim a pvc:// source names exists and is bound. Sources of other
    schemes (s3, gs, hf) are fetched by the engine when it starts: the operator cannot see them."""
    missing = [claim.name for claim in claims if claim.phase is None]
    if missing:
        return (False, "ClaimNotFound",
                f"PersistentVolumeClaim {', '.join(missing)} named by the model sources does "
                f"not exist in namespace {md.namespace}")  # fmt: skip
    unbound = [f"{claim.name} ({claim.phase})" for claim in claims if claim.phase != "Bound"]
    if unbound:
        return (False, "ClaimNotBound",
                f"PersistentVolumeClaim {', '.join(unbound)} is not bound to a volume")  # fmt: skip
    if claims:
        return (True, "ClaimBound",
                f"PersistentVolumeClaim {', '.join(c.name for c in claims)} bound")  # fmt: skip
    return (True, "FetchedByEngine",
            f"{md.spec.model.uri} is fetched by the engine when it starts")  # fmt: skip


def _upgrading(rayservice: dict[str, Any] | None) -> Verdict:
    """An engine change makes KubeRay start a new cluster beside the serving one (NewCluster
    upgrade); the Service moves to it once its Serve application runs."""
    status = (rayservice or {}).get("status", {})
    active = status.get("activeServiceStatus", {}).get("rayClusterName")
    pending = status.get("pendingServiceStatus", {}).get("rayClusterName")
    failed = _failed_applications(rayservice, "pendingServiceStatus")
    if active and pending and failed:
        return (True, "NewClusterFailing",
                brief(f"RayCluster {pending} fails with the changed engine configuration "
                      f"({active} still serves): {'; '.join(failed)}"))  # fmt: skip
    if active and pending:
        return (True, "NewClusterStarting",
                f"RayCluster {pending} is starting with the changed engine configuration; "
                f"{active} serves until it runs")  # fmt: skip
    if active:
        return (False, "UpToDate", f"RayCluster {active} serves the current engine configuration")
    return (False, "NotServingYet", "no RayCluster serves yet")


def _pods_healthy(problems: tuple[PodProblem, ...]) -> Verdict:
    if not problems:
        return (True, "NoFailingPods", "no serving pod is failing")
    # The first failing pod's container reason (CrashLoopBackOff, ImagePullBackOff…) says what
    # kind of fix is needed; the message lists every failing pod.
    return (False, problems[0].reason, brief("; ".join(p.message for p in problems)))


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    *,
    previous: ModelDeploymentStatus | None,
    options: RenderOptions,
    now: datetime,
) -> ModelDeploymentStatus:
    conditions = list(previous.conditions) if previous else []

    verdict = observed.residency
    if observed.apply_error:
        reconciled = _condition(md, now, RECONCILED, (False, "ApplyFailed", observed.apply_error))
    elif verdict is not None and verdict[0] is ConditionStatus.FALSE:
        # Nothing was applied: the operator removed what ran, so the spec is not served.
        reconciled = _condition(
            md, now, RECONCILED,
            (False, "Withdrawn", f"RayService {md.name} withdrawn, nothing runs: "
             f"ResidencyCompliant is False ({verdict[1]})"),
        )  # fmt: skip
    elif verdict is not None and verdict[0] is ConditionStatus.UNKNOWN:
        reconciled = _condition(
            md, now, RECONCILED,
            (False, "Held", f"nothing applied while the tenancy is in doubt: {verdict[2]}"),
        )  # fmt: skip
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
    model_source = _model_source(md, observed.claims)
    conditions = set_condition(conditions, _condition(md, now, MODEL_SOURCE, model_source))
    pods_healthy = _pods_healthy(observed.pod_problems)
    conditions = set_condition(conditions, _condition(md, now, PODS_HEALTHY, pods_healthy))
    upgrading = _upgrading(observed.rayservice)
    conditions = set_condition(conditions, _condition(md, now, UPGRADING, upgrading))

    ready: Verdict
    if residency.status is ConditionStatus.FALSE:
        ready = (False, residency.reason, residency.message)
    elif reconciled.status is not ConditionStatus.TRUE:
        ready = (False, reconciled.reason, reconciled.message)
    elif not model_source[0]:
        ready = model_source
    elif not available[0] and not pods_healthy[0]:
        ready = pods_healthy  # why it is unavailable: the container's own reason
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
