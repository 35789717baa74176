"""Operator telemetry: Prometheus metrics, health endpoints and OpenTelemetry tracing."""

from __future__ import annotations

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
MANAGED = Gauge(
    "tramontane_managed_objects",
    "Managed objects by kind, condition type and condition status.",
    ["kind", "condition", "status"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge("tramontane_build_info", "Operator version.", ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)


class ConditionCounts:
    """Tracks each object's conditions so the MANAGED gauge counts objects, not events."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._by_object: dict[str, dict[str, str]] = {}

    def update(self, key: str, conditions: dict[str, str] | None) -> None:
        with self._lock:
            if conditions is None:
                self._by_object.pop(key, None)
            else:
                self._by_object[key] = conditions
            totals: dict[tuple[str, str], int] = {}
            for object_conditions in self._by_object.values():
                for condition, status in object_conditions.items():
                    totals[(condition, status)] = totals.get((condition, status), 0) + 1
            seen_types = {condition for condition, _ in totals}
            for condition in seen_types:
                for status in ("True", "False", "Unknown"):
                    MANAGED.labels(self.kind, condition, status).set(
                        totals.get((condition, status), 0)
                    )


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
