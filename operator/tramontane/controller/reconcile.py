"""Reconcile one ModelDeployment: apply its children, observe them, write status and events.

Level-triggered and idempotent: the same spec applies the same manifests (a server-side apply that
changes nothing does not write), and status is only patched when it changed, so an unchanged
ModelDeployment costs reads only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from tramontane.api.conditions import ConditionStatus, ConditionType, EventReason, Reason, find
from tramontane.api.v1alpha1 import ModelDeployment, ModelDeploymentStatus
from tramontane.controller import telemetry
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import (
    MODELDEPLOYMENT,
    PERSISTENTVOLUMECLAIM,
    RAYCLUSTER,
    RAYSERVICE,
    Kube,
)
from tramontane.controller.watch_cache import child_cache, child_filter, pod_problems
from tramontane.policy.residency import (
    ResidencyError,
    governing_policy,
    region_requirements,
    telemetry_allowed,
)
from tramontane.render.drift import cluster_drift, drift_revert_patch
from tramontane.render.rayservice import (
    FIELD_MANAGER,
    RenderOptions,
    model_claims,
    render_children,
    worker_bounds_patch,
)
from tramontane.render.status import (
    ClaimState,
    Observed,
    ResidencyVerdict,
    compute_status,
    serving_cluster_name,
    transitions,
)
from tramontane.render.tenant import TenancyError

log = logging.getLogger(__name__)
CONTROLLER_NAME = "tramontane.dev/operator"
KIND = "ModelDeployment"
deployment_metrics = telemetry.DeploymentMetrics(KIND)

# The Event (type, reason) a condition's transition posts.
_EVENT_REASONS: dict[tuple[str, ConditionStatus], tuple[str, EventReason]] = {
    (ConditionType.RECONCILED, ConditionStatus.FALSE): ("Warning", EventReason.RECONCILE_FAILED),
    (ConditionType.RESIDENCY_COMPLIANT, ConditionStatus.FALSE): (
        "Warning", EventReason.RESIDENCY_VIOLATION,
    ),
    (ConditionType.AVAILABLE, ConditionStatus.TRUE): ("Normal", EventReason.AVAILABLE),
    (ConditionType.AVAILABLE, ConditionStatus.FALSE): ("Normal", EventReason.UNAVAILABLE),
    (ConditionType.READY, ConditionStatus.TRUE): ("Normal", EventReason.READY),
    (ConditionType.UPGRADING, ConditionStatus.TRUE): ("Normal", EventReason.UPGRADE_STARTED),
    (ConditionType.PODS_HEALTHY, ConditionStatus.FALSE): ("Warning", EventReason.PODS_FAILING),
    (ConditionType.MODEL_SOURCE_READY, ConditionStatus.FALSE): (
        "Warning", EventReason.MODEL_SOURCE_NOT_READY,
    ),
}  # fmt: skip


def _status_of(body: dict[str, Any]) -> ModelDeploymentStatus | None:
    raw = body.get("status")
    if not raw or "conditions" not in raw:
        return None
    try:
        return ModelDeploymentStatus.model_validate(raw)
    except ValueError:
        return None  # written by someone else in another shape: recompute from scratch


def reconcile_modeldeployment(
    kube: Kube, body: dict[str, Any], options: RenderOptions, facts: Facts
) -> None:
    """`facts`: the namespace's tenancy as the indexes show it (see indexes.Facts)."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return  # garbage collection removes the children through their owner references
    md = ModelDeployment.from_body(body)
    started = time.perf_counter()
    with telemetry.tracer.start_as_current_span(
        "reconcile ModelDeployment",
        attributes={
            "tramontane.tenant": md.namespace,
            "tramontane.deployment": md.name,
            "tramontane.model": md.served_name,
            "k8s.namespace.name": md.namespace,
            "tramontane.generation": md.generation,
        },
    ) as span:
        result = "success"
        apply_error: str | None = None
        residency: ResidencyVerdict | None = None
        rayservice: dict[str, Any] | None = None
        try:
            residency, placement, options = _confirmed_residency(kube, facts, md, options)
            if residency.status is ConditionStatus.FALSE:
                _withdraw(kube, md, residency.message)
            elif residency.status is ConditionStatus.UNKNOWN:
                # Tenancy in doubt: apply nothing on the word of the labels; what runs keeps
                # the placement it was applied with until the operator has restored them.
                rayservice = kube.get(RAYSERVICE, md.namespace, md.name)
            else:
                rayservice = _apply_children(kube, md, options, placement)
        except ApiException as error:
            result = "error"
            apply_error = f"{error.status} {error.reason}: {_api_message(error)}"
            span.set_attribute("error", True)
            log.warning("apply failed for %s/%s: %s", md.namespace, md.name, apply_error)
        raycluster = None
        cluster_name = serving_cluster_name(rayservice)
        if cluster_name:
            raycluster = child_cache.observed("RayCluster", md.namespace, cluster_name)
            raycluster = raycluster or kube.get(RAYCLUSTER, md.namespace, cluster_name)
        previous = _status_of(body)
        status = compute_status(
            md,
            Observed(
                rayservice=rayservice,
                raycluster=raycluster,
                apply_error=apply_error,
                residency=residency,
                claims=_claims(kube, md),
                pod_problems=pod_problems.of(md.namespace, md.name),
            ),
            previous=previous,
            options=options,
            now=datetime.now(UTC).replace(microsecond=0),
        )
        if previous is None or status.to_wire() != previous.to_wire():
            try:
                kube.patch_status(MODELDEPLOYMENT, md.namespace, md.name, status.to_wire())
            except ApiException as error:
                if error.status != 404:  # deleted meanwhile: nothing to report on
                    raise
                return
            _post_events(kube, body, previous, status)
        _remember(md, status.to_wire())
        deployment_metrics.update(
            f"{md.namespace}/{md.name}", {c.type: c.status.value for c in status.conditions}
        )
        ready = find(status.conditions, ConditionType.READY)
        span.set_attribute("tramontane.ready", ready.status.value if ready else "Unknown")
        telemetry.RECONCILES.labels(KIND, result).inc()
        telemetry.RECONCILE_DURATION.labels(KIND).observe(time.perf_counter() - started)
        if apply_error:
            raise ReconcileError(apply_error)


def _post_events(
    kube: Kube,
    body: dict[str, Any],
    previous: ModelDeploymentStatus | None,
    status: ModelDeploymentStatus,
) -> None:
    """Events for what changed: condition transitions, and the switch to an upgraded cluster."""
    before = previous.ray_cluster_name if previous else None
    if before and status.ray_cluster_name and before != status.ray_cluster_name:
        kube.event(
            body,
            type_="Normal",
            reason=EventReason.SERVING_CLUSTER_CHANGED,
            note=f"now served by RayCluster {status.ray_cluster_name} "
            f"(was {before}, which KubeRay deletes after its delay)",
            action="Upgrade",
            controller=CONTROLLER_NAME,
        )
    for condition in transitions(previous, status):
        if previous is None and condition.status is not ConditionStatus.TRUE:
            continue  # a new object is not yet available: that is no news
        event = _EVENT_REASONS.get((condition.type, condition.status))
        if event:
            kube.event(
                body,
                type_=event[0],
                reason=event[1],
                note=condition.message,
                action="Reconcile",
                controller=CONTROLLER_NAME,
            )


# What the last reconcile of each ModelDeployment wrote: (uid, generation, status).
_last_written: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
_last_written_lock = threading.Lock()


def _remember(md: ModelDeployment, status: dict[str, Any]) -> None:
    with _last_written_lock:
        _last_written[(md.namespace, md.name)] = (
            str(md.metadata.get("uid")),
            md.generation,
            status,
        )


def as_last_written(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The object to reconcile from a watched `body`, which may predate our last status write:
    with the status we last wrote (what the next reconcile compares with, so no transition is
    reported twice). None when `body` is older than the spec we last reconciled (read it)."""
    meta = body.get("metadata", {})
    with _last_written_lock:
        last = _last_written.get((meta.get("namespace"), meta.get("name")))
    if last is None or last[0] != meta.get("uid"):
        return dict(body)  # never written, or another object of the same name
    _, generation, status = last
    if int(meta.get("generation") or 0) < generation:
        return None
    return {**body, "status": status}


def is_echo(body: Mapping[str, Any]) -> bool:
    """True when the object is exactly as our last reconcile left it (same spec generation and
    the status we wrote): its watch event is the echo of our own write."""
    meta = body.get("metadata", {})
    with _last_written_lock:
        last = _last_written.get((meta.get("namespace"), meta.get("name")))
    if last is None:
        return False
    uid, generation, status = last
    return (
        uid == meta.get("uid")
        and generation == meta.get("generation")
        and status == dict(body.get("status") or {})
    )


def _residency(
    facts: Facts, md: ModelDeployment, options: RenderOptions
) -> tuple[ResidencyVerdict, list[dict[str, Any]], RenderOptions]:
    """The deployment's ResidencyCompliant verdict and the node placement its pods must get.

    The tenant comes from the Tenant objects, checked against the namespace's labels (see
    render.tenant.owning_tenant). A namespace whose tenancy cannot be trusted fails closed with
    Unknown: nothing is applied (never rendered unpinned or under another tenant's policy) and
    nothing is removed (what runs was placed under the right policy) until the labels agree.
    A missing policy or a disallowed source is False: the deployment is withdrawn.
    """
    try:
        tenant = facts.owner()
    except TenancyError as error:
        return ResidencyVerdict(ConditionStatus.UNKNOWN, error.reason, str(error)), [], options
    try:
        policy = governing_policy(md, tenant, facts.policy_of(tenant))
    except ResidencyError as refusal:
        return ResidencyVerdict(ConditionStatus.FALSE, refusal.reason, str(refusal)), [], options
    placement = region_requirements(policy.spec)
    where = ", ".join(policy.spec.regions) + (
        f" (zones {', '.join(policy.spec.zones)})" if policy.spec.zones else ""
    )
    message = (f"Ray pods required to run in {where} by ResidencyPolicy {policy.name} "
               f"({policy.spec.jurisdiction})")  # fmt: skip
    if options.otlp_endpoint and not telemetry_allowed(options.otlp_endpoint, policy.spec):
        # Request spans name the tenant, model and route: they go only where the policy says.
        options = replace(options, otlp_endpoint=None)
        message += "; request spans not exported: the installation's OTLP endpoint is not in "
        message += "its telemetryEndpoints"
    return ResidencyVerdict(ConditionStatus.TRUE, Reason.WITHIN_POLICY, message), placement, options


def _confirmed_residency(
    kube: Kube, facts: Facts, md: ModelDeployment, options: RenderOptions
) -> tuple[ResidencyVerdict, list[dict[str, Any]], RenderOptions]:
    """`_residency` from the indexes, and from the API when they would hold or withdraw the
    deployment. The indexes may miss what the API has: a replica resumed after a peering pause
    reconciles while kopf is still listing the other kinds again (seen: a standby taking over
    found the Tenant but not yet its ResidencyPolicy, and withdrew a compliant deployment), and
    a policy applied with its deployment may be indexed after it. Neither a withdrawal nor a
    False or Unknown status is decided on their word alone, as admission confirms a refusal."""
    verdict, placement, rendered = _residency(facts, md, options)
    if verdict.status is ConditionStatus.TRUE:
        return verdict, placement, rendered
    log.info("%s/%s: %s on the indexes' word, confirming from the API", md.namespace, md.name,
             verdict.reason)  # fmt: skip
    confirmed = Facts.from_api(kube, md.namespace, with_deployments=False, with_regions=False)
    return _residency(confirmed, md, options)


def _claims(kube: Kube, md: ModelDeployment) -> tuple[ClaimState, ...]:
    """The claims its pvc:// sources name, from the claims watch (read from the API when the
    watch has not listed them yet, e.g. right after a restart)."""
    states = []
    for name in model_claims(md):
        claim = child_cache.observed("PersistentVolumeClaim", md.namespace, name)
        if claim is None:
            try:
                claim = kube.get(PERSISTENTVOLUMECLAIM, md.namespace, name)
            except ApiException as error:
                log.warning("cannot read claim %s/%s: %s", md.namespace, name, error.reason)
                continue  # unknown is not missing: say nothing rather than something false
        phase = claim.get("status", {}).get("phase", "Pending") if claim else None
        states.append(ClaimState(name, phase))
    return tuple(states)


def _withdraw(kube: Kube, md: ModelDeployment, why: str) -> None:
    """A deployment that breaks its residency policy must not run: remove its RayService."""
    if kube.get(RAYSERVICE, md.namespace, md.name) is not None:
        log.warning("deleting RayService %s/%s: %s", md.namespace, md.name, why)
        kube.delete(RAYSERVICE, md.namespace, md.name)


def _apply_children(
    kube: Kube, md: ModelDeployment, options: RenderOptions, placement: list[dict[str, Any]]
) -> dict[str, Any]:
    """Apply every child that is not already as rendered; returns the RayService as it is."""
    rayservice: dict[str, Any] = {}
    for manifest in render_children(md, options, placement):
        applied = child_cache.up_to_date(manifest)
        if applied is None:
            applied = kube.apply(manifest, FIELD_MANAGER)
            child_cache.record_apply(manifest, applied)
            child_filter.record(manifest["kind"], applied)
        if manifest["kind"] == "RayService":
            rayservice = applied
            _sync_worker_bounds(kube, md, manifest, applied)
            _revert_drift(kube, md, manifest, applied)
    return rayservice


def _revert_drift(
    kube: Kube, md: ModelDeployment, manifest: dict[str, Any], rayservice: dict[str, Any]
) -> None:
    """Put back what someone changed in the RayCluster KubeRay runs from our RayService (see
    render.drift). Only once KubeRay has seen the RayService's current spec, and only for the
    cluster made from it: the pending one during an upgrade, else the active one (the active
    cluster of an upgrade in flight legitimately has the old spec)."""
    status = rayservice.get("status") or {}
    if status.get("observedGeneration") != rayservice["metadata"].get("generation"):
        return
    name = (status.get("pendingServiceStatus") or {}).get("rayClusterName") or (
        status.get("activeServiceStatus") or {}
    ).get("rayClusterName")
    if not name:
        return
    if child_cache.drift_checked(md.namespace, name):
        return  # its spec has not changed since it was last found as rendered
    # The comparison needs the whole spec: the cache keeps it until this check has seen it.
    # Not seen yet: its first event reconciles the deployment again.
    raycluster = child_cache.unchecked_raycluster(md.namespace, name)
    if raycluster is None:
        return
    rendered = manifest["spec"]["rayClusterConfig"]
    drifted = cluster_drift(rendered, raycluster)
    if not drifted:
        child_cache.record_drift_check(raycluster)
        return
    if not _patch_raycluster(kube, md, name, drift_revert_patch(rendered, raycluster)):
        return
    log.warning("RayCluster %s/%s drifted from its render, reverted: %s", md.namespace, name,
                ", ".join(drifted))  # fmt: skip
    kube.event(
        {
            "apiVersion": md.api_version,
            "kind": KIND,
            "metadata": {**md.metadata, "name": md.name, "namespace": md.namespace},
        },
        type_="Warning",
        reason=EventReason.DRIFT_REVERTED,
        note=f"RayCluster {name} was changed outside the operator and put back: "
        f"{', '.join(drifted[:8])}{' …' if len(drifted) > 8 else ''}",
        action="Reconcile",
        controller=CONTROLLER_NAME,
    )


def _raycluster(md: ModelDeployment, name: str) -> dict[str, Any] | None:
    """A RayCluster of the deployment as the watch last saw it; None if not seen yet (its
    first event reconciles the deployment again)."""
    return child_cache.observed("RayCluster", md.namespace, name)


def _patch_raycluster(
    kube: Kube, md: ModelDeployment, name: str, operations: list[dict[str, Any]]
) -> bool:
    """Apply a guarded JSON patch; False if the cluster is gone or changed meanwhile (its watch
    event brings us back with a fresh look)."""
    try:
        patched = kube.json_patch(RAYCLUSTER, md.namespace, name, operations)
    except ApiException as error:
        if error.status not in (404, 409, 422):
            raise
        return False
    child_cache.observe({"kind": "RayCluster", **patched})
    return True


def _sync_worker_bounds(
    kube: Kube, md: ModelDeployment, manifest: dict[str, Any], rayservice: dict[str, Any]
) -> None:
    """A new scaling minimum or maximum, onto the RayClusters KubeRay runs for the RayService
    (it does not pass those on itself: see render.rayservice.worker_bounds_patch)."""
    status = rayservice.get("status") or {}
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        name = (status.get(key) or {}).get("rayClusterName")
        if not name:
            continue
        raycluster = _raycluster(md, name)
        operations = worker_bounds_patch(manifest, raycluster) if raycluster else []
        if not operations or not _patch_raycluster(kube, md, name, operations):
            continue
        log.info("RayCluster %s/%s: worker bounds set to the RayService's", md.namespace, name)


def forget(namespace: str, name: str) -> None:
    deployment_metrics.update(f"{namespace}/{name}", None)
    with _last_written_lock:
        _last_written.pop((namespace, name), None)


class ReconcileError(RuntimeError):
    """Applying the children failed; status says why. The caller retries later."""


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message", error.body))
    except ValueError:
        return str(error.body)
