"""Operator telemetry: Prometheus metrics, health endpoints and OpenTelemetry tracing."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tramontane import __version__
from tramontane.api.conditions import ConditionStatus

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
RECONCILES = Counter(
    "tramontane_reconcile_total",
    "Reconciles by kind and result (success, error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "tramontane_reconcile_duration_seconds",
    "Time to reconcile one object, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ADMISSION_DURATION = Histogram(
    "tramontane_admission_duration_seconds",
    "Time from a ModelDeployment review reaching the handler to its decision, by mode.",
    ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
MANAGED = Gauge(
    "tramontane_managed_objects",
    "Managed objects by kind, condition type and condition status.",
    ["kind", "condition", "status"],
    registry=REGISTRY,
)
ADMISSION_MODE = Gauge(
    "tramontane_admission_mode",
    "1 for how this replica decides admissions (memory, api, standby), 0 for the others.",
    ["mode"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge("tramontane_build_info", "Operator version.", ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)
# Per object, for alerts that must name the deployment (kube-state-metrics' *_status_condition
# convention: one series per status, 1 for the one the condition has). `tenant` is the namespace,
# as on the serving app's metrics.
DEPLOYMENT_CONDITION = Gauge(
    "tramontane_modeldeployment_status_condition",
    "1 for the status a ModelDeployment's condition has, 0 for the other statuses.",
    ["tenant", "deployment", "condition", "status"],
    registry=REGISTRY,
)
TENANT_GPU_QUOTA = Gauge(
    "tramontane_tenant_gpu_quota",
    "GPUs the tenant may use (spec.quota.gpus).",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_GPU_REQUESTED = Gauge(
    "tramontane_tenant_gpu_requested",
    "GPUs counted against the tenant's quota: each of its ModelDeployments at its autoscaling "
    "maximum (maxReplicas x accelerator.count), as the admission webhook counts them.",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_DEPLOYMENT_QUOTA = Gauge(
    "tramontane_tenant_model_deployment_quota",
    "ModelDeployments the tenant may have (spec.quota.modelDeployments).",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_DEPLOYMENTS = Gauge(
    "tramontane_tenant_model_deployments",
    "ModelDeployments in the tenant's namespace.",
    ["tenant"],
    registry=REGISTRY,
)
_TENANT_GAUGES = (
    TENANT_GPU_QUOTA,
    TENANT_GPU_REQUESTED,
    TENANT_DEPLOYMENT_QUOTA,
    TENANT_DEPLOYMENTS,
)
STATUSES = tuple(status.value for status in ConditionStatus)


class KindMetrics:
    """Tracks each object's conditions so the MANAGED gauge counts objects, not events.

    A kind's reconcile series exist from the start, at 0: an error rate (and its alert) then reads
    0 rather than nothing until the first error.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._by_object: dict[str, dict[str, str]] = {}
        for result in ("success", "error"):
            RECONCILES.labels(kind, result)
        RECONCILE_DURATION.labels(kind)

    def update(self, key: str, conditions: dict[str, str] | None) -> None:
        """Record an object's conditions (type → status); None: the object is gone."""
        with self._lock:
            previous = self._by_object.pop(key, None)
            if conditions is not None:
                self._by_object[key] = conditions
            totals: dict[tuple[str, str], int] = {}
            for object_conditions in self._by_object.values():
                for condition, status in object_conditions.items():
                    totals[(condition, status)] = totals.get((condition, status), 0) + 1
            seen_types = {condition for condition, _ in totals}
            for condition in seen_types:
                for status in STATUSES:
                    MANAGED.labels(self.kind, condition, status).set(
                        totals.get((condition, status), 0)
                    )
            self._object_changed(key, previous or {}, conditions)

    def _object_changed(
        self, key: str, previous: dict[str, str], conditions: dict[str, str] | None
    ) -> None:
        """Hook for a kind's per-object series (called under the lock)."""


class DeploymentMetrics(KindMetrics):
    """ModelDeployments (keys `namespace/name`): counts, and each one's conditions."""

    def _object_changed(
        self, key: str, previous: dict[str, str], conditions: dict[str, str] | None
    ) -> None:
        tenant, _, deployment = key.partition("/")
        current = conditions or {}
        for condition in previous.keys() - current.keys():
            for status in STATUSES:
                DEPLOYMENT_CONDITION.remove(tenant, deployment, condition, status)
        for condition, value in current.items():
            for status in STATUSES:
                DEPLOYMENT_CONDITION.labels(tenant, deployment, condition, status).set(
                    1 if status == value else 0
                )


class TenantMetrics(KindMetrics):
    """Tenants: condition counts, and each one's quota and what is counted against it."""

    def quota(
        self,
        tenant: str,
        *,
        gpus: int,
        gpus_requested: int,
        deployments: int,
        deployments_in_use: int,
    ) -> None:
        with self._lock:
            TENANT_GPU_QUOTA.labels(tenant).set(gpus)
            TENANT_GPU_REQUESTED.labels(tenant).set(gpus_requested)
            TENANT_DEPLOYMENT_QUOTA.labels(tenant).set(deployments)
            TENANT_DEPLOYMENTS.labels(tenant).set(deployments_in_use)

    def _object_changed(
        self, key: str, previous: dict[str, str], conditions: dict[str, str] | None
    ) -> None:
        if conditions is None:  # the tenant is gone: so are its series
            for gauge in _TENANT_GAUGES:
                with contextlib.suppress(KeyError):
                    gauge.remove(key)


def setup_tracing(exporter: SpanExporter | None = None) -> TracerProvider:
    """A tracer provider; spans go over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    The standard OTEL_* variables (service name, headers, protocol…) configure the exporter.
    """
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "tramontane-operator"),
         "service.version": __version__}
    )  # fmt: skip
    provider = TracerProvider(resource=resource)
    if exporter is None and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
        log.info("exporting spans over OTLP to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


tracer = trace.get_tracer("tramontane.controller")


def serve_http(port: int, host: str, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """/metrics, /healthz (process alive) and /readyz (watching the API) on one port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif self.path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="telemetry-http", daemon=True).start()
    return server
