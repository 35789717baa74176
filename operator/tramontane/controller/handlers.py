"""kopf handlers: thin adapters from watch events, timers and admission reviews to reconcile().

Level-triggered: every event of a ModelDeployment, or of a child that carries its label
(RayService, its RayCluster, PodMonitor), reconciles that ModelDeployment from what is in the API
now. A deleted or edited child therefore comes back on its own event, within a second, and a
restarted operator converges everything from the initial listing.

Handlers are coroutines on kopf's loop: they read kopf's indexes there (indexes.Facts) and run
the reconcile, which calls the API, on a thread pool. A reconcile that fails is not retried in
place: its status says Reconciled=False, and that is what starts the retry timer for it
(`retry_modeldeployment`), which kopf runs with backoff until the object is Reconciled, pauses
with the rest when this replica is a standby, and stops when the object goes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf

from tramontane.api.conditions import ConditionStatus, ConditionType
from tramontane.api.labels import ADMISSION_LABEL, DEPLOYMENT_LABEL, TENANT_LABEL
from tramontane.api.tenancy import ResidencyPolicy
from tramontane.controller import (
    admission,
    indexes,
    peering,
    reconcile,
    telemetry,
    tenants,
)
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import BINDING, MODELDEPLOYMENT, POD, TENANT, Kube
from tramontane.controller.settings import TramontaneSettings
from tramontane.controller.watch_cache import child_cache, child_filter, pod_problems
from tramontane.render.admission import render_bindings
from tramontane.render.rayservice import FIELD_MANAGER, RenderOptions
from tramontane.render.status import pod_problem
from tramontane.render.tenant import TenantOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
MODELDEPLOYMENTS = ("tramontane.dev", "v1alpha1", "modeldeployments")
TENANTS = ("tramontane.dev", "v1alpha1", "tenants")
# A failed reconcile is retried after 2, 4, 8 … seconds, at most RETRY_MAX_S apart.
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 30.0
# How often this replica puts its ADMISSION_LABEL right (keep_admission_label).
ADMISSION_LABEL_CHECK_S = 2.0
# Every Tenant is reconciled this often (its guard rails re-applied, its quota use refreshed).
TENANT_RESYNC_S = 60.0


class OperatorState:
    """What handlers share: the operator's settings and the render options made of them, the API
    client, the thread pools, this replica's standing among its peers, and a lock per object (an
    event and a timer may overlap)."""

    def __init__(self, config: TramontaneSettings) -> None:
        self.config = config
        self.kube: Kube | None = None
        self.options: RenderOptions = config.render_options()
        self.tenant_options: TenantOptions = config.tenant_options()
        self.pool = ThreadPoolExecutor(
            max_workers=config.reconcile_workers, thread_name_prefix="reconcile"
        )
        # Admission has its own threads: behind queued reconciles, reviews would time out.
        self.admission_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="admission")
        self.standing = peering.Standing(config.peering, self.client)
        # Set by the first handler call: kopf runs handlers only once every index is filled.
        self.indexes_ready = threading.Event()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._admission_queues: dict[str, list[tuple[admission.Review, asyncio.Future[None]]]] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self.label_keeper: asyncio.Task[None] | None = None
        # Set once this replica knows whether it decides admissions and its pod label says so:
        # part of readiness, so that `helm install --wait` returns with the webhook routed.
        self.routed = threading.Event()

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def drop_lock(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def admission_queue(
        self, namespace: str
    ) -> list[tuple[admission.Review, asyncio.Future[None]]]:
        """The namespace's reviews waiting for a decision (touched on kopf's loop only)."""
        return self._admission_queues.setdefault(namespace, [])

    def start_flusher(self, namespace: str, flusher: Coroutine[Any, Any, None]) -> None:
        """Run `flusher` unless one already runs for the namespace (then it takes the queue);
        one at a time per namespace, so that each batch sees what the ones before admitted."""
        if namespace in self._flushers:
            flusher.close()
            return
        self._flushers[namespace] = asyncio.get_running_loop().create_task(flusher)

    def flusher_done(self, namespace: str) -> None:
        self._flushers.pop(namespace, None)

    def forget_namespace(self, namespace: str) -> None:
        if not self._admission_queues.get(namespace):
            self._admission_queues.pop(namespace, None)
        admission.in_flight.forget(namespace)
        admission.confirmations.forget(namespace)

    def client(self) -> Kube:
        if self.kube is None:
            self.kube = Kube.from_environment()
        return self.kube


runtime = OperatorState(TramontaneSettings.from_env(os.environ))


async def _in_pool(call: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool or runtime.pool, functools.partial(call, *args))


def reconcile_once(namespace: str, name: str, body: dict[str, Any] | None, facts: Facts) -> bool:
    """One reconcile, one at a time per ModelDeployment; False if it failed (status says why and
    the retry timer takes over).

    `body`: the object as the watch showed it (None: read it). A watched body may predate our
    last status write: it is taken with that status (reconcile.as_last_written), and read afresh
    if its spec is older than the one we last reconciled.
    """
    kube = runtime.client()
    with runtime.lock(namespace, name):
        current = reconcile.as_last_written(body) if body is not None else None
        if current is None:
            current = kube.get(MODELDEPLOYMENT, namespace, name)
        if current is None:
            reconcile.forget(namespace, name)
            runtime.drop_lock(namespace, name)
            return True
        try:
            reconcile.reconcile_modeldeployment(kube, current, runtime.options, facts)
        except reconcile.ReconcileError as error:
            log.info("%s/%s: reconcile failed, retried by its timer: %s", namespace, name, error)
            return False
        return True


async def _reconcile(namespace: str, name: str, kwargs: Mapping[str, Any]) -> bool:
    runtime.indexes_ready.set()
    facts = Facts.gather(namespace, kwargs)
    body = indexes.deployment_body(kwargs, namespace, name)
    return await _in_pool(reconcile_once, namespace, name, body, facts)


@kopf.on.event(*MODELDEPLOYMENTS)
async def modeldeployment_event(
    event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, **kwargs: Any
) -> None:
    if namespace is None:
        return  # cannot happen for a namespaced kind; keeps the types honest
    runtime.indexes_ready.set()
    if event.get("type") == "DELETED":
        reconcile.forget(namespace, name)
        runtime.drop_lock(namespace, name)
        return
    if reconcile.is_echo(body):
        return  # the watch echoing the status we just wrote: nothing new to act on
    facts = Facts.gather(namespace, kwargs)
    await _in_pool(reconcile_once, namespace, name, dict(body), facts)


def _reconcile_failed(status: kopf.Status, **_: Any) -> bool:
    conditions = status.get("conditions") or []
    return any(
        c.get("type") == ConditionType.RECONCILED and c.get("status") == ConditionStatus.FALSE
        for c in conditions
    )


@kopf.timer(
    *MODELDEPLOYMENTS, when=_reconcile_failed, initial_delay=RETRY_FIRST_S, interval=RETRY_MAX_S
)
async def retry_modeldeployment(name: str, namespace: str | None, **kwargs: Any) -> None:
    """Retries a deployment whose last reconcile failed (no watch event may come to retry it:
    an admission policy that refused its RayService was relaxed, the API server was away),
    with backoff, until its status says Reconciled. kopf puts a finalizer on the object while
    the timer runs, so that the timer is stopped before the object goes."""
    if namespace and not await _reconcile(namespace, name, kwargs):
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (int(kwargs.get("retry", 0)) + 1))
        raise kopf.TemporaryError("reconcile failed; its status says why", delay=delay)


async def _owner_event(
    kind: str, event: kopf.RawEvent, body: kopf.Body, namespace: str | None,
    kwargs: Mapping[str, Any],
) -> None:  # fmt: skip
    meta = body.get("metadata", {})
    if event.get("type") == "DELETED":
        child_cache.forget(kind, meta.get("namespace", ""), meta.get("name", ""))
    else:
        child_cache.observe({"kind": kind, **dict(body)})
    owner = meta.get("labels", {}).get(DEPLOYMENT_LABEL)
    if owner and namespace and child_filter.changed(kind, event, dict(body)):
        await _reconcile(namespace, owner, kwargs)


@kopf.on.event("ray.io", "v1", "rayservices", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def rayservice_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **kwargs: Any
) -> None:
    await _owner_event("RayService", event, body, namespace, kwargs)


@kopf.on.event("ray.io", "v1", "rayclusters", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def raycluster_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **kwargs: Any
) -> None:
    await _owner_event("RayCluster", event, body, namespace, kwargs)


@kopf.on.event(
    "monitoring.coreos.com", "v1", "podmonitors", labels={DEPLOYMENT_LABEL: kopf.PRESENT}
)
async def podmonitor_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, **kwargs: Any
) -> None:
    await _owner_event("PodMonitor", event, body, namespace, kwargs)


@kopf.on.event("", "v1", "persistentvolumeclaims")
async def claim_event(event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None,
                      **kwargs: Any) -> None:  # fmt: skip
    """A claim appearing, binding or going away changes ModelSourceReady of the deployments
    whose pvc:// sources name it."""
    if namespace is None:
        return
    before = child_cache.observed("PersistentVolumeClaim", namespace, name)
    if event.get("type") == "DELETED":
        child_cache.forget("PersistentVolumeClaim", namespace, name)
        after = None
    else:
        child_cache.observe({"kind": "PersistentVolumeClaim", **dict(body)})
        after = child_cache.observed("PersistentVolumeClaim", namespace, name)
    if before is not None and after is not None and _phase(before) == _phase(after):
        return  # a resize or a label: nothing deployments report on
    for deployment in list(kwargs["deployments"].get(namespace, ())):
        if name in deployment.claims:
            await _reconcile(namespace, deployment.name, kwargs)


def _phase(claim: dict[str, Any]) -> str | None:
    phase = claim.get("status", {}).get("phase")
    return str(phase) if phase else None


@kopf.on.event("", "v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def serving_pod_event(event: kopf.RawEvent, body: kopf.Body, name: str,
                            namespace: str | None, **kwargs: Any) -> None:  # fmt: skip
    """A Ray pod that starts or stops failing (crash loop, image pull, bad config) changes its
    deployment's PodsHealthy condition."""
    owner = body.get("metadata", {}).get("labels", {}).get(DEPLOYMENT_LABEL)
    if namespace is None or not owner:
        return
    problem = None if event.get("type") == "DELETED" else pod_problem(dict(body))
    if pod_problems.observe(namespace, owner, name, problem):
        await _reconcile(namespace, owner, kwargs)


def _label_own_pod(deciding: bool) -> None:
    pod, namespace = os.environ.get("POD_ID", ""), runtime.config.pod_namespace or ""
    value = "decides" if deciding else None  # None: merge patch removes the label
    patch = {"metadata": {"labels": {ADMISSION_LABEL: value}}}
    runtime.client().merge_patch(POD, namespace, pod, patch)


async def keep_admission_label() -> None:
    """Label this replica's pod while it decides admissions, and only then: the webhook Service
    selects that label, so reviews reach the one deciding replica (as Patroni routes to its
    primary). Checked every ADMISSION_LABEL_CHECK_S; a restarted process removes the label its
    pod kept from before. Without POD_NAMESPACE (not in a pod) only the metric is kept."""
    labelled: bool | None = None
    in_pod = bool(runtime.config.pod_namespace)
    while True:
        try:
            mode = await admission_mode()
            for each in peering.Mode:
                telemetry.ADMISSION_MODE.labels(each.value).set(1 if each is mode else 0)
            deciding = mode is not peering.Mode.STANDBY
            if in_pod and deciding != labelled:
                await _in_pool(_label_own_pod, deciding, pool=runtime.admission_pool)
                log.info("admission: this replica %s", "decides" if deciding else "stands by")
                labelled = deciding
            if runtime.standing.announced:
                runtime.routed.set()
        except Exception:  # the API away: the label stays as it was until the next check
            log.warning("admission label not updated; retried", exc_info=True)
        await asyncio.sleep(ADMISSION_LABEL_CHECK_S)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own Events say what happened; kopf's per-handler ones (a retry timer's temporary
    # errors among them) would be noise, and API writes.
    settings.posting.enabled = False
    settings.execution.max_workers = runtime.config.reconcile_workers
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.admission.server = admission.webhook_server(runtime.config)
    # Installed by Helm, the chart owns the ValidatingWebhookConfiguration (and the operator
    # needs no RBAC on webhook configurations): TRAMONTANE_WEBHOOK_CONFIG="" leaves it alone.
    settings.admission.managed = runtime.config.webhook_config or None
    settings.peering.lifetime = peering.LIFETIME_S
    runtime.client()
    # A replica that starts as the standby is known as one before it ever becomes active (see
    # peering.Standing: its indexes are trusted only once they have been listed again).
    await _in_pool(runtime.standing.mode)
    runtime.label_keeper = asyncio.get_running_loop().create_task(keep_admission_label())


@kopf.on.cleanup()
async def stop_label_keeper(**_: Any) -> None:
    if runtime.label_keeper is not None:
        runtime.label_keeper.cancel()


def _tenant_namespace(kwargs: Mapping[str, Any], name: str) -> str | None:
    for namespace, store in kwargs["tenants_by_namespace"].items():
        if any(tenant.name == name for tenant in store):
            return str(namespace)
    return None


def reconcile_tenant_once(name: str, facts: Facts | None, with_deployments: bool) -> None:
    """Reconcile a Tenant; with_deployments: then its ModelDeployments (policy or tenant changed,
    so their placement and compliance may have)."""
    kube = runtime.client()
    with runtime.lock("", name):
        body = kube.get(TENANT, None, name)
        if body is None or facts is None:
            tenants.tenant_metrics.update(name, None)
            return
        tenants.reconcile_tenant(kube, body, runtime.tenant_options, facts)
    if with_deployments:
        for deployment in facts.deployments:
            reconcile_once(facts.namespace, deployment.name, None, facts)


async def _reconcile_tenant(name: str, kwargs: Mapping[str, Any], with_deployments: bool) -> None:
    runtime.indexes_ready.set()
    namespace = _tenant_namespace(kwargs, name)
    facts = Facts.gather(namespace, kwargs, with_deployments=True) if namespace else None
    await _in_pool(reconcile_tenant_once, name, facts, with_deployments)


@kopf.on.event(*TENANTS)
async def tenant_event(event: kopf.RawEvent, body: kopf.Body, name: str, **kwargs: Any) -> None:
    if event.get("type") == "DELETED":
        tenants.tenant_metrics.update(name, None)
        return
    # Only a spec change (e.g. another residency policy) can change its deployments: one the
    # status does not show as observed yet. Status updates (quota use) must not re-reconcile
    # every deployment of the tenant; on first sight (operator start) the deployments' own
    # initial events reconcile them.
    generation = body.get("metadata", {}).get("generation")
    observed = (body.get("status") or {}).get("observedGeneration")
    await _reconcile_tenant(name, kwargs, with_deployments=observed != generation)


@kopf.timer(*TENANTS, interval=TENANT_RESYNC_S, initial_delay=TENANT_RESYNC_S)
async def resync_tenant(name: str, **kwargs: Any) -> None:
    """Guard rails put back and quota use refreshed every TENANT_RESYNC_S, whatever the watches
    brought (kopf keeps a finalizer on Tenants for it; the chart's webhook already needs the
    operator to delete a Tenant)."""
    await _reconcile_tenant(name, kwargs, with_deployments=False)


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(event: kopf.RawEvent, body: kopf.Body, name: str,
                          **kwargs: Any) -> None:  # fmt: skip
    """A tenant namespace whose tramontane.dev/* labels were changed or removed (only the
    operator may, but a guard can be switched off) is relabelled by its Tenant's reconcile at
    once, and its deployments are re-reconciled: until then they fail closed (held: nothing
    applied, nothing removed)."""
    runtime.indexes_ready.set()
    if event.get("type") == "DELETED":
        runtime.forget_namespace(name)
        return
    if body.get("metadata", {}).get("deletionTimestamp"):
        return  # a namespace going away takes nothing new
    for tenant in indexes.tenants_of(kwargs, name):
        if tenants.labels_drifted(dict(body), tenant):
            log.warning("namespace %s: tenant labels drifted; restoring (Tenant %s)", name,
                        tenant.name)  # fmt: skip
            await _reconcile_tenant(tenant.name, kwargs, with_deployments=True)


@kopf.on.event("", "v1", "resourcequotas", labels={TENANT_LABEL: kopf.PRESENT})
async def tenant_quota_event(body: kopf.Body, **kwargs: Any) -> None:
    """A tenant is only Ready once its quota is computed (see tenants.py): the quota's status
    update brings a waiting tenant to Ready. Once Ready, the quota's status follows every Ray pod
    that comes and goes, and none of that changes the tenant (its resync timer re-applies it)."""
    name = body["metadata"]["labels"][TENANT_LABEL]
    if not indexes.tenant_is_ready(kwargs, name):
        await _reconcile_tenant(name, kwargs, False)


def _bind_policy(policy: ResidencyPolicy, deleted: bool, used: bool) -> None:
    kube = runtime.client()
    bindings = render_bindings(policy)
    if not deleted:
        for binding in bindings:
            kube.apply(binding, FIELD_MANAGER)
    elif not used:
        # The bindings outlive their policy (no owner): with no param they refuse every Ray pod
        # and object in the namespaces still labelled with it. Unused, they can go.
        for binding in bindings:
            kube.delete(BINDING, None, binding["metadata"]["name"])


@kopf.on.event("tramontane.dev", "v1alpha1", "residencypolicies")
async def residency_policy_event(event: kopf.RawEvent, body: kopf.Body, name: str,
                                 **kwargs: Any) -> None:  # fmt: skip
    """Bind the admission policies to the policy's namespaces; then a changed (or new, or
    deleted) policy re-reconciles every tenant that references it."""
    users = indexes.policy_users(kwargs, name)
    deleted = event.get("type") == "DELETED"
    await _in_pool(_bind_policy, ResidencyPolicy.from_body(dict(body)), deleted, bool(users))
    for user in users:
        await _reconcile_tenant(user, kwargs, with_deployments=True)


@kopf.on.validate(*MODELDEPLOYMENTS, operations=["CREATE", "UPDATE"], id="modeldeployment")
async def validate_modeldeployment(
    body: kopf.Body, namespace: str | None, dryrun: bool, **kwargs: Any
) -> None:
    """Admission from memory: on the settled active replica, the namespace's facts come from
    the indexes and nothing is read or written (see admission.InFlight and peering.Mode).

    Reviews of one namespace are decided in arrival order by one flusher on kopf's loop: those
    that arrive while a batch is being decided form the next batch. Under a burst, a review
    waits for at most one batch before its own."""
    started = time.perf_counter()
    namespace = namespace or body.get("metadata", {}).get("namespace") or ""
    review = admission.Review(dict(body), dryrun)
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    runtime.admission_queue(namespace).append((review, future))
    runtime.start_flusher(namespace, _flush_reviews(namespace, kwargs))
    await future
    telemetry.ADMISSION_DURATION.labels(review.mode.value).observe(time.perf_counter() - started)
    if review.outcome is not None:
        raise review.outcome


async def _flush_reviews(namespace: str, kwargs: Mapping[str, Any]) -> None:
    try:
        await _flush_queue(namespace, kwargs)
    finally:
        # No await since the queue was last seen empty: a review queued after this starts a
        # new flusher.
        runtime.flusher_done(namespace)


async def admission_mode() -> peering.Mode:
    """How this replica decides admissions now; an API call only when the cached view of the
    peering expired (on a thread: never on kopf's loop)."""
    mode = runtime.standing.cached_mode()
    if mode is None:
        mode = await _in_pool(runtime.standing.mode, pool=runtime.admission_pool)
    if mode is peering.Mode.MEMORY and not runtime.indexes_ready.is_set():
        return peering.Mode.API  # kopf has not filled the indexes yet
    return mode


async def _flush_queue(namespace: str, kwargs: Mapping[str, Any]) -> None:
    queue = runtime.admission_queue(namespace)
    while queue:
        batch = list(queue)
        queue.clear()
        reviews = [review for review, _ in batch]
        try:
            mode = await admission_mode()
            for review in reviews:
                review.mode = mode
            if mode is peering.Mode.MEMORY:
                facts = Facts.gather(namespace, kwargs, with_deployments=True, with_regions=True)
                # Decided here on the loop (microseconds, no I/O): no thread hop.
                refused = admission.admit_from_memory(namespace, reviews, facts)
                if refused:
                    await _in_pool(admission.confirm, runtime.client(), namespace, refused,
                                   pool=runtime.admission_pool)  # fmt: skip
            else:
                await _in_pool(admission.admit_all, runtime.client(), namespace, reviews, mode,
                               pool=runtime.admission_pool)  # fmt: skip
        except Exception as error:  # every review of the batch gets the error (kopf: 500)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            continue
        for _, future in batch:
            if not future.done():
                future.set_result(None)


@kopf.on.validate(*TENANTS, operations=["DELETE"], id="tenant-delete")
async def validate_tenant_deletion(body: kopf.Body, **kwargs: Any) -> None:
    # On DELETE the reviewed object is the old one.
    await _in_pool(
        admission.validate_tenant_deletion,
        runtime.client(),
        dict(kwargs.get("old") or body),
        pool=runtime.admission_pool,
    )


@kopf.on.validate(
    "tramontane.dev", "v1alpha1", "residencypolicies", operations=["DELETE"],
    id="residencypolicy-delete",
)  # fmt: skip
async def validate_policy_deletion(body: kopf.Body, **kwargs: Any) -> None:
    await _in_pool(
        admission.validate_policy_deletion,
        runtime.client(),
        dict(kwargs.get("old") or body),
        pool=runtime.admission_pool,
    )
