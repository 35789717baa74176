"""kopf handlers: thin adapters from watch events to reconcile().

Level-triggered: every event of a ModelDeployment, or of a child that carries its label
(RayService, its RayCluster, PodMonitor), reconciles that ModelDeployment from what is in the API
now. A deleted or edited child therefore comes back on its own event, within a second, and a
restarted operator converges everything from the initial listing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from tramontane.api.tenancy import ResidencyPolicy
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.controller import admission, children, reconcile, tenants
from tramontane.controller import settings as environment
from tramontane.controller.kube import BINDING, MODELDEPLOYMENT, TENANT, Kube
from tramontane.render.admission import render_bindings
from tramontane.render.rayservice import (
    DEPLOYMENT_LABEL,
    FIELD_MANAGER,
    RenderOptions,
    model_claims,
)
from tramontane.render.status import pod_problem
from tramontane.render.tenant import TENANT_LABEL, TenantOptions

log = logging.getLogger(__name__)
RETRY_DELAYS = (1, 2, 4, 8, 15)


class Runtime:
    """What handlers share: the API client, render options and a lock per ModelDeployment."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.options: RenderOptions = environment.render_options()
        self.tenant_options: TenantOptions = environment.tenant_options()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def drop_lock(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube.from_environment()
        return self.kube


runtime = Runtime()


def reconcile_by_name(namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
    """Reconcile with retries; one reconcile at a time per ModelDeployment.

    Once we have written a deployment's status, the object is read fresh under the lock: a watch
    event's body may predate that write and would make us report the same transition twice.
    """
    kube = runtime.client()
    for delay in (*RETRY_DELAYS, None):
        with runtime.lock(namespace, name):
            # A watch event's body is only trusted for a deployment we never wrote status to.
            fresh = body is not None and not reconcile.has_written(namespace, name)
            current = body if fresh else kube.get(MODELDEPLOYMENT, namespace, name)
            body = None
            if current is None:
                reconcile.forget(namespace, name)
                runtime.drop_lock(namespace, name)
                return
            try:
                reconcile.reconcile_modeldeployment(kube, current, runtime.options)
                return
            except reconcile.ReconcileError as error:
                if delay is None:
                    log.error("giving up on %s/%s for now: %s", namespace, name, error)
                    return
        time.sleep(delay)


@kopf.on.event("tramontane.dev", "v1alpha1", "modeldeployments")
def modeldeployment_event(
    event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, **_: Any
) -> None:
    if namespace is None:
        return  # cannot happen for a namespaced kind; keeps the types honest
    if event.get("type") == "DELETED":
        admission.index.forget(namespace, name)
        reconcile.forget(namespace, name)
        runtime.drop_lock(namespace, name)
        return
    admission.index.observe(dict(body))
    if reconcile.is_echo(body):
        return  # the watch echoing the status we just wrote: nothing new to act on
    reconcile_by_name(namespace, name, dict(body))


class ChildFilter:
    """Lets through only the child events that can change what the owner's reconcile does.

    KubeRay rewrites its objects' status often (timestamps, counters we don't read); reconciling
    the owner for each of those would cost the API server writes-free but real round trips, and
    queue behind the events that matter. A child's spec change (generation), its deletion and the
    status fields that feed our status always pass.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], object] = {}
        self._lock = threading.Lock()

    def changed(self, kind: str, event: kopf.RawEvent, body: kopf.Body) -> bool:
        meta = body.get("metadata", {})
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            if event.get("type") == "DELETED":
                self._seen.pop(key, None)
                return True
            fingerprint = (meta.get("generation"), status_fingerprint(body))
            if self._seen.get(key) == fingerprint:
                return False
            self._seen[key] = fingerprint
            return True


def status_fingerprint(body: kopf.Body) -> object:
    status = body.get("status") or {}
    if body.get("kind") == "RayCluster":
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions", [])}
        return (
            status.get("state"),
            status.get("readyWorkerReplicas"),
            status.get("availableWorkerReplicas"),
            conditions.get("HeadPodReady"),
        )
    if body.get("kind") == "RayService":
        return tuple(
            (
                key,
                (status.get(key) or {}).get("rayClusterName"),
                repr((status.get(key) or {}).get("applicationStatuses")),
            )
            for key in ("activeServiceStatus", "pendingServiceStatus")
        )
    return None


child_filter = ChildFilter()


def _owner_event(kind: str, event: kopf.RawEvent, body: kopf.Body, namespace: str | None) -> None:
    meta = body.get("metadata", {})
    if event.get("type") == "DELETED":
        children.cache.forget(kind, meta.get("namespace", ""), meta.get("name", ""))
    else:
        children.cache.observe({"kind": kind, **dict(body)})
    owner = meta.get("labels", {}).get(DEPLOYMENT_LABEL)
    if owner and namespace and child_filter.changed(kind, event, body):
        reconcile_by_name(namespace, owner)


@kopf.on.event("ray.io", "v1", "rayservices", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def rayservice_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any
) -> None:
    _owner_event("RayService", event, body, namespace)


@kopf.on.event("ray.io", "v1", "rayclusters", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def raycluster_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any
) -> None:
    _owner_event("RayCluster", event, body, namespace)


@kopf.on.event(
    "monitoring.coreos.com", "v1", "podmonitors", labels={DEPLOYMENT_LABEL: kopf.PRESENT}
)
def podmonitor_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **_: Any
) -> None:
    _owner_event("PodMonitor", event, body, namespace)


@kopf.on.event("", "v1", "persistentvolumeclaims")
def claim_event(event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None,
                **_: Any) -> None:  # fmt: skip
    """A claim appearing, binding or going away changes ModelSourceReady of the deployments
    whose pvc:// sources name it."""
    if namespace is None:
        return
    before = children.cache.observed("PersistentVolumeClaim", namespace, name)
    if event.get("type") == "DELETED":
        children.cache.forget("PersistentVolumeClaim", namespace, name)
        after = None
    else:
        children.cache.observe({"kind": "PersistentVolumeClaim", **dict(body)})
        after = children.cache.observed("PersistentVolumeClaim", namespace, name)
    if before is not None and after is not None and _phase(before) == _phase(after):
        return  # a resize or a label: nothing deployments report on
    for item in admission.index.deployments(runtime.client(), namespace):
        if name in model_claims(ModelDeployment.from_body(item)):
            reconcile_by_name(namespace, item["metadata"]["name"])


def _phase(claim: dict[str, Any]) -> str | None:
    phase = claim.get("status", {}).get("phase")
    return str(phase) if phase else None


@kopf.on.event("", "v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def serving_pod_event(event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None,
                      **_: Any) -> None:  # fmt: skip
    """A Ray pod that starts or stops failing (crash loop, image pull, bad config) changes its
    deployment's PodsHealthy condition."""
    owner = body.get("metadata", {}).get("labels", {}).get(DEPLOYMENT_LABEL)
    if namespace is None or not owner:
        return
    problem = None if event.get("type") == "DELETED" else pod_problem(dict(body))
    if children.pod_problems.observe(namespace, owner, name, problem):
        reconcile_by_name(namespace, owner)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own Events say what happened; kopf's per-handler log events would be noise.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = int(os.environ.get("TRAMONTANE_RECONCILE_WORKERS", "16"))
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.admission.server = admission.webhook_server()
    # Installed by Helm, the chart owns the ValidatingWebhookConfiguration (and the operator
    # needs no RBAC on webhook configurations): TRAMONTANE_WEBHOOK_CONFIG="" leaves it alone.
    managed = os.environ.get("TRAMONTANE_WEBHOOK_CONFIG", "tramontane.dev")
    settings.admission.managed = managed or None
    runtime.client()


def reconcile_tenant_by_name(name: str, with_deployments: bool = False) -> None:
    """Reconcile a Tenant; with_deployments: then its ModelDeployments (policy or tenant changed,
    so their placement and compliance may have)."""
    kube = runtime.client()
    with runtime.lock("", name):
        body = kube.get(TENANT, None, name)
        if body is None:
            tenants.condition_counts.update(name, None)
            return
        tenants.reconcile_tenant(kube, body, runtime.tenant_options)
    if with_deployments:
        namespace = body["spec"]["namespace"]
        for item in kube.list_all(MODELDEPLOYMENT, namespace):
            reconcile_by_name(namespace, item["metadata"]["name"])


_tenant_generations: dict[str, int] = {}


@kopf.on.event("tramontane.dev", "v1alpha1", "tenants")
def tenant_event(event: kopf.RawEvent, body: kopf.Body, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        tenants.condition_counts.update(name, None)
        _tenant_generations.pop(name, None)
        return
    # Only a spec change (e.g. another residency policy) can change its deployments; status
    # updates (quota use) must not re-reconcile every deployment of the tenant. On first sight
    # (operator start) the deployments' own initial events reconcile them.
    generation = int(body.get("metadata", {}).get("generation", 0))
    previous = _tenant_generations.get(name)
    _tenant_generations[name] = generation
    reconcile_tenant_by_name(name, with_deployments=previous is not None and previous != generation)


@kopf.on.event("", "v1", "namespaces")
def namespace_event(event: kopf.RawEvent, body: kopf.Body, name: str, **_: Any) -> None:
    """A tenant namespace whose tramontane.dev/* labels were changed or removed (only the
    operator may, but a guard can be switched off) is relabelled by its Tenant's reconcile at
    once, and its deployments are re-reconciled: until then they fail closed (held: nothing
    applied, nothing removed)."""
    if event.get("type") == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        return  # a namespace going away takes nothing new
    for tenant in tenants.claimants(runtime.client(), name):
        if tenants.labels_drifted(dict(body), tenant):
            log.warning("namespace %s: tenant labels drifted; restoring (Tenant %s)", name,
                        tenant.name)  # fmt: skip
            reconcile_tenant_by_name(tenant.name, with_deployments=True)


@kopf.on.event("", "v1", "resourcequotas", labels={TENANT_LABEL: kopf.PRESENT})
def tenant_quota_event(body: kopf.Body, **_: Any) -> None:
    """A tenant is only Ready once its quota is computed (see tenants.py)."""
    reconcile_tenant_by_name(body["metadata"]["labels"][TENANT_LABEL])


@kopf.on.event("tramontane.dev", "v1alpha1", "residencypolicies")
def residency_policy_event(event: kopf.RawEvent, body: kopf.Body, name: str, **_: Any) -> None:
    """Bind the admission policies to the policy's namespaces; then a changed (or new, or
    deleted) policy re-reconciles every tenant that references it."""
    kube = runtime.client()
    users = tenants.users_of(kube, name)
    bindings = render_bindings(ResidencyPolicy.from_body(dict(body)))
    if event.get("type") != "DELETED":
        for binding in bindings:
            kube.apply(binding, FIELD_MANAGER)
    elif not users:
        # The bindings outlive their policy (no owner): with no param they refuse every Ray pod
        # and object in the namespaces still labelled with it. Unused, they can go.
        for binding in bindings:
            kube.delete(BINDING, None, binding["metadata"]["name"])
    for user in users:
        reconcile_tenant_by_name(user, with_deployments=True)


@kopf.on.validate(
    "tramontane.dev", "v1alpha1", "modeldeployments", operations=["CREATE", "UPDATE"],
    id="modeldeployment",
)  # fmt: skip
async def validate_modeldeployment(
    body: kopf.Body, namespace: str | None, dryrun: bool, **_: Any
) -> None:
    # Admission has its own threads: behind queued reconciles, API requests would time out.
    namespace = namespace or body.get("metadata", {}).get("namespace") or ""
    await asyncio.get_running_loop().run_in_executor(
        _admission_pool,
        admission.validate_modeldeployment,
        runtime.client(),
        dict(body),
        namespace,
        dryrun,
    )


@kopf.on.validate(
    "tramontane.dev", "v1alpha1", "tenants", operations=["DELETE"], id="tenant-delete"
)
async def validate_tenant_deletion(body: kopf.Body, **kwargs: Any) -> None:
    # On DELETE the reviewed object is the old one.
    await asyncio.get_running_loop().run_in_executor(
        _admission_pool,
        admission.validate_tenant_deletion,
        runtime.client(),
        dict(kwargs.get("old") or body),
    )


@kopf.on.validate(
    "tramontane.dev", "v1alpha1", "residencypolicies", operations=["DELETE"],
    id="residencypolicy-delete",
)  # fmt: skip
async def validate_policy_deletion(body: kopf.Body, **kwargs: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(
        _admission_pool,
        admission.validate_policy_deletion,
        runtime.client(),
        dict(kwargs.get("old") or body),
    )


_admission_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="admission")
