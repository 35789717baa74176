"""Run the operator: kopf's reactor plus the telemetry endpoint and a periodic resync."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kopf

from tramontane.controller import handlers, telemetry
from tramontane.controller.kube import MODELDEPLOYMENT, TENANT

log = logging.getLogger(__name__)
RESYNC_SECONDS = 60


def _resync_unreconciled(stop: threading.Event) -> None:
    """Retry deployments whose last reconcile failed (no watch event may come to retry them) and
    refresh every Tenant's quota use."""
    while not stop.wait(RESYNC_SECONDS):
        try:
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
    threading.Thread(target=_resync_unreconciled, args=(stop,), daemon=True).start()
    kwargs: dict[str, Any] = {"ready_flag": ready, "stop_flag": stop, "standalone": True}
    if namespaces:
        kwargs["namespaces"] = namespaces
    else:
        kwargs["clusterwide"] = True
    log.info("tramontane operator starting (metrics and probes on %s:%d)", host, port)
    kopf.run(**kwargs)


__all__ = ["handlers", "run"]
