"""Run the operator: kopf's reactor plus the telemetry endpoint."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kopf

from tramontane.controller import handlers, telemetry

log = logging.getLogger(__name__)


def run(namespaces: list[str] | None = None) -> None:
    config = handlers.runtime.config
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kopf.objects", "kopf.activities.startup"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    telemetry.setup_tracing()
    ready = threading.Event()
    port, host = config.metrics_port, config.metrics_host
    # Ready: kopf started, and this replica's webhook routing is settled (see handlers).
    telemetry.serve_http(port, host, lambda: ready.is_set() and handlers.runtime.routed.is_set())
    # TRAMONTANE_PEERING names the ClusterKopfPeering that replicas share (set by the chart);
    # unset, the operator runs alone (development, tests).
    standing = handlers.runtime.standing
    # No stop_flag for kopf: it would wait for a threading.Event in its default executor, which
    # nothing sets on SIGTERM, and asyncio's shutdown joins that thread: the process never exited.
    kwargs: dict[str, Any] = {"ready_flag": ready}
    os.environ["POD_ID"] = standing.identity  # kopf's identity among the peers: the same
    if standing.name is None:
        kwargs["standalone"] = True
    else:
        kwargs.update(peering_name=standing.name, priority=standing.priority)
        log.info("peering %s as %s with priority %d", standing.name, standing.identity,
                 standing.priority)  # fmt: skip
    if namespaces:
        kwargs["namespaces"] = namespaces
    else:
        kwargs["clusterwide"] = True
    log.info("tramontane operator starting (metrics and probes on %s:%d)", host, port)
    kopf.run(**kwargs)


__all__ = ["handlers", "run"]
