"""Run the operator: kopf's reactor plus the telemetry endpoint and a periodic resync."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
from typing import Any

import kopf

from tramontane.controller import handlers, peering, telemetry
from tramontane.controller.kube import CLUSTERKOPFPEERING, MODELDEPLOYMENT, TENANT

log = logging.getLogger(__name__)
RESYNC_SECONDS = 60


class Peering:
    """This replica's place among its peers (None name: standalone, always active)."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        # kopf identifies a peer by POD_ID (the chart sets the pod name); we need the same id.
        self.identity = os.environ.setdefault("POD_ID", f"{socket.gethostname()}-{os.getpid()}")
        self.priority = peering.priority_from_start()

    def active(self) -> bool:
        if self.name is None:
            return True
        body = handlers.runtime.client().get(CLUSTERKOPFPEERING, None, self.name) or {}
        return peering.is_active(
            body.get("status") or {},
            self.identity,
            self.priority,
            datetime.datetime.now(datetime.UTC),
        )


def _resync_unreconciled(stop: threading.Event, peers: Peering) -> None:
    """Retry deployments whose last reconcile failed (no watch event may come to retry them) and
    refresh every Tenant's quota use."""
    while not stop.wait(RESYNC_SECONDS):
        try:
            if not peers.active():
                continue  # another replica works; kopf has paused our watches too
            items = handlers.runtime.client().list_all(MODELDEPLOYMENT)
        except Exception:
            log.exception("resync listing failed")
            continue
        for tenant in handlers.runtime.client().list_all(TENANT):
            # Quota use in the Tenant's status follows its deployments at this pace.
            handlers.reconcile_tenant_by_name(tenant["metadata"]["name"])
        for item in items:
            conditions = item.get("status", {}).get("conditions", [])
            reconciled = next((c for c in conditions if c.get("type") == "Reconciled"), None)
            if reconciled is None or reconciled.get("status") != "True":
                meta = item["metadata"]
                handlers.reconcile_by_name(meta["namespace"], meta["name"])


def run(namespaces: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("TRAMONTANE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kopf.objects", "kopf.activities.startup"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    telemetry.setup_tracing()
    ready = threading.Event()
    stop = threading.Event()
    port = int(os.environ.get("TRAMONTANE_METRICS_PORT", "8080"))
    host = os.environ.get("TRAMONTANE_METRICS_HOST", "0.0.0.0")  # noqa: S104 (pod network)
    telemetry.serve_http(port, host, ready.is_set)
    # TRAMONTANE_PEERING names the ClusterKopfPeering that replicas share (set by the chart);
    # unset, the operator runs alone (development, tests).
    peers = Peering(os.environ.get("TRAMONTANE_PEERING") or None)
    threading.Thread(target=_resync_unreconciled, args=(stop, peers), daemon=True).start()
    # No stop_flag for kopf: it would wait for a threading.Event in its default executor, which
    # nothing sets on SIGTERM, and asyncio's shutdown joins that thread: the process never exited.
    kwargs: dict[str, Any] = {"ready_flag": ready}
    if peers.name is None:
        kwargs["standalone"] = True
    else:
        kwargs.update(peering_name=peers.name, priority=peers.priority)
        log.info("peering %s as %s with priority %d", peers.name, peers.identity, peers.priority)
    if namespaces:
        kwargs["namespaces"] = namespaces
    else:
        kwargs["clusterwide"] = True
    log.info("tramontane operator starting (metrics and probes on %s:%d)", host, port)
    try:
        kopf.run(**kwargs)
    finally:
        stop.set()


__all__ = ["handlers", "run"]
