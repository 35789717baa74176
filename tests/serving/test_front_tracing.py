"""The serving app's request spans, without Ray: UsageMiddleware around a stand-in endpoint.

The real path (Ray Serve replicas exporting to an OpenTelemetry Collector) is
tests/serving/test_tracing.py; this checks the span's shape in a second, with the SDK's in-memory
exporter.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tramontane.serving import tracing
from tramontane.serving.front import UsageMiddleware
from tramontane.serving.usage import UsageMetrics

# starlette and Ray (tramontane.serving.usage) are only in the serving environment; no engine.
pytestmark = pytest.mark.serving


async def completions(request: Request) -> JSONResponse:
    # What the inner layers note in the request's state (OpenAIFront, ResponseAccounting).
    request.state.model = "finance-reports"
    request.state.api_key = "app-a"
    request.state.streaming = False
    request.state.prompt_tokens = 11
    request.state.completion_tokens = 7
    return JSONResponse({"object": "chat.completion"})


async def broken(request: Request) -> JSONResponse:
    return JSONResponse({"error": "engine died"}, status_code=503)


def client() -> TestClient:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/completions", broken, methods=["POST"]),
        ]
    )
    metrics = UsageMetrics()
    app.add_middleware(
        UsageMiddleware, tenant="acme-finance", deployment="llama-3-8b", metrics=lambda: metrics
    )
    return TestClient(app)


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer(tracing.SCOPE))
    yield exporter
    provider.shutdown()


def test_without_an_endpoint_the_tracer_is_a_no_op() -> None:
    assert isinstance(tracing.make_tracer({}), trace.NoOpTracer)
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    assert isinstance(tracing.make_tracer(disabled), trace.NoOpTracer)
    assert not isinstance(
        tracing.make_tracer({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}), trace.NoOpTracer
    )


def test_a_request_is_one_server_span_named_by_its_route(exported: InMemorySpanExporter) -> None:
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with client() as http:
        response = http.post(
            "/v1/chat/completions", headers={"traceparent": f"00-{trace_id}-{parent}-01"}
        )
    assert response.status_code == 200
    (span,) = exported.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.kind == trace.SpanKind.SERVER
    assert span.context is not None
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "url.path": "/v1/chat/completions",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "tramontane.tenant": "acme-finance",
        "tramontane.deployment": "llama-3-8b",
        "tramontane.model": "finance-reports",
        "tramontane.api_key": "app-a",
        "tramontane.streaming": False,
        "gen_ai.usage.input_tokens": 11,
        "gen_ai.usage.output_tokens": 7,
    }
    assert span.status.status_code == trace.StatusCode.UNSET


def test_server_errors_mark_the_span_and_unrouted_paths_keep_the_name_generic(
    exported: InMemorySpanExporter,
) -> None:
    with client() as http:
        assert http.post("/v1/completions").status_code == 503
        assert http.post("/v1/no-such-endpoint").status_code == 404
        assert http.get("/healthz").status_code == 404  # not /v1: not traced
    failed, unrouted = exported.get_finished_spans()
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "503"
    assert unrouted.name == "POST"
    assert (unrouted.attributes or {})["url.path"] == "/v1/no-such-endpoint"
    assert unrouted.status.status_code == trace.StatusCode.UNSET


def test_with_tracing_off_requests_record_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_tracer", trace.NoOpTracer())
    with client() as http:
        assert http.post("/v1/chat/completions").status_code == 200
