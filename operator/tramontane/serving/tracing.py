"""OpenTelemetry spans of the serving app: one server span per OpenAI API request.

Configured by the standard OTEL_* variables, which the operator renders into the Ray containers
(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME) when it is installed with a tracing endpoint;
every Ray process of the pod inherits them. Spans go over OTLP/HTTP (protobuf). Without an
endpoint nothing is recorded: the tracer is OpenTelemetry's no-op one.

A Ray Serve replica is a process of its own, started long after the application was built: the
tracer provider is made lazily, on the first request that the replica's process handles.

Span attributes: `tramontane.tenant`, `tramontane.deployment`, `tramontane.model` (the name the
client asked for), `tramontane.api_key` (the key's name in the tenant's Secret, never the key),
`tramontane.streaming`, `tramontane.time_to_first_token_s` (streams), the token counts as
`gen_ai.usage.input_tokens`/`gen_ai.usage.output_tokens`, and the HTTP ones
(`http.request.method`, `http.route`, `url.path`, `http.response.status_code`). A `traceparent`
header from the client makes the span a child of the client's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from tramontane import __version__

log = logging.getLogger(__name__)

SERVICE_NAME = "tramontane-serving"
SCOPE = "tramontane.serving"

_tracer: trace.Tracer | None = None
_lock = threading.Lock()


def tracer() -> trace.Tracer:
    """This process's tracer, made on first use from its environment."""
    global _tracer  # noqa: PLW0603
    if _tracer is None:
        with _lock:
            if _tracer is None:
                _tracer = make_tracer(os.environ)
    return _tracer


def make_tracer(env: Mapping[str, str]) -> trace.Tracer:
    """A tracer exporting over OTLP/HTTP when the environment names an endpoint, else a no-op."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return trace.NoOpTracer()
    # Imported here: a process without an endpoint never loads the SDK.
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
    except ImportError:
        # Requests must not fail for want of tracing (an image built without the exporter).
        log.warning("OTLP/HTTP exporter not installed: request spans are not exported")
        return trace.NoOpTracer()
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
            "service.version": __version__,
        }
    )
    # Not the global provider: Ray and vLLM have tracing of their own, configured separately.
    provider = TracerProvider(resource=resource)
    # The exporter and the batch processor read the other OTEL_* variables (headers, timeouts,
    # OTEL_BSP_SCHEDULE_DELAY…) themselves.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("exporting request spans over OTLP to %s", endpoint)
    return provider.get_tracer(SCOPE, __version__)


def incoming_context(headers: list[tuple[bytes, bytes]]) -> Context:
    """The caller's trace context (W3C `traceparent`), if the request carries one."""
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
    return propagate.extract(carrier)
