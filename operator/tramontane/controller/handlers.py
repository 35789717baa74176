"""kopf handlers: thin adapters from watch events to reconcile().

Level-triggered: every event of a ModelDeployment, or of a child that carries its label
(RayService, its RayCluster, PodMonitor), reconciles that ModelDeployment from what is in the API
now. A deleted or edited child therefore comes back on its own event, within a second, and a
restarted operator converges everything from the initial listing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf

from tramontane.controller import reconcile
from tramontane.controller.kube import MODELDEPLOYMENT, Kube
from tramontane.render.rayservice import DEPLOYMENT_LABEL, RenderOptions

log = logging.getLogger(__name__)
RETRY_DELAYS = (1, 2, 4, 8, 15)


class Runtime:
    """What handlers share: the API client, render options and a lock per ModelDeployment."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.options = RenderOptions()
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


def reconcile_by_name(namespace: str, name: str) -> None:
    """Reconcile with retries; one reconcile at a time per ModelDeployment.

    The object is read fresh under the lock: the body of a watch event may predate the status
    that the previous reconcile just wrote, and would make it report the same transition twice.
    """
    kube = runtime.client()
    for delay in (*RETRY_DELAYS, None):
        with runtime.lock(namespace, name):
            current = kube.get(MODELDEPLOYMENT, namespace, name)
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
def modeldeployment_event(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
    if namespace is None:
        return  # cannot happen for a namespaced kind; keeps the types honest
    if event.get("type") == "DELETED":
        reconcile.forget(namespace, name)
        runtime.drop_lock(namespace, name)
        return
    reconcile_by_name(namespace, name)


def _owner_event(body: kopf.Body, namespace: str | None) -> None:
    owner = body.get("metadata", {}).get("labels", {}).get(DEPLOYMENT_LABEL)
    if owner and namespace:
        reconcile_by_name(namespace, owner)


@kopf.on.event("ray.io", "v1", "rayservices", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def rayservice_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    _owner_event(body, namespace)


@kopf.on.event("ray.io", "v1", "rayclusters", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def raycluster_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    _owner_event(body, namespace)


@kopf.on.event(
    "monitoring.coreos.com", "v1", "podmonitors", labels={DEPLOYMENT_LABEL: kopf.PRESENT}
)
def podmonitor_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    _owner_event(body, namespace)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own Events say what happened; kopf's per-handler log events would be noise.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    runtime.client()
