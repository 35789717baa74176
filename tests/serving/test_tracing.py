"""Request spans of the serving app, received by a real OpenTelemetry Collector over OTLP/HTTP.

The session's Ray instance runs with OTEL_EXPORTER_OTLP_ENDPOINT set to the test collector, as a
RayService's pods do when the operator is installed with a tracing endpoint; every request sends
a W3C `traceparent` with a trace id of its own, which finds its span among the session's.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.kube import eventually
from tests.otelcol import Collector, ReceivedSpan
from tests.serving.openai_requests import chat, sse_events
from tests.serving.served_app import ServedApp
from tramontane.api.serving import ServingArgs

pytestmark = pytest.mark.serving

SERVER = 2  # OTLP SpanKind
ERROR = 2  # OTLP StatusCode


def traced() -> tuple[str, str, dict[str, str]]:
    """A fresh client trace: (trace id, parent span id, the headers that carry it)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01"}


def span_of(collector: Collector, trace_id: str) -> ReceivedSpan:
    spans = eventually(
        lambda: [s for s in collector.spans() if s.trace_id == trace_id],
        30,
        f"the serving app's span of trace {trace_id} at the collector",
    )
    (span,) = spans
    return span


def identity(app: ServedApp) -> dict[str, Any]:
    args = ServingArgs.model_validate(app.config["applications"][0]["args"])
    return {"tramontane.tenant": args.tenant, "tramontane.deployment": args.deployment}


def test_a_chat_completion_is_one_server_span_with_tenant_deployment_model_and_usage(
    sample_app: ServedApp, otel_collector: Collector
) -> None:
    trace_id, parent, headers = traced()
    with sample_app.client() as client:
        response = client.post(
            "/v1/chat/completions", json=chat(sample_app.model, max_tokens=7), headers=headers
        )
    assert response.status_code == 200, response.text
    span = span_of(otel_collector, trace_id)
    assert span.name == "POST /v1/chat/completions"
    assert span.service == "tramontane-serving"
    assert span.kind == SERVER
    assert span.parent_span_id == parent  # a child of the client's span
    assert span.attributes | identity(sample_app) == span.attributes
    assert span.attributes["tramontane.model"] == sample_app.model
    assert span.attributes["tramontane.api_key"] == "app-a"  # the key's name, never the key
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["http.route"] == "/v1/chat/completions"
    assert span.attributes["tramontane.streaming"] is False
    assert span.attributes["gen_ai.usage.output_tokens"] == 7
    assert span.attributes["gen_ai.usage.input_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert span.status != ERROR


def test_a_streamed_adapter_completion_records_time_to_first_token(
    sample_app: ServedApp, otel_collector: Collector
) -> None:
    adapter = sample_app.adapters[0]
    trace_id, _, headers = traced()
    with (
        sample_app.client("app-b") as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat(adapter, max_tokens=16, stream=True),
            headers=headers,
        ) as response,
    ):
        assert response.status_code == 200
        chunks = sse_events(response)[:-1]
    # Time to *text*: the test model only ever generates printable text.
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    span = span_of(otel_collector, trace_id)
    assert span.attributes["tramontane.model"] == adapter  # the name the client used
    assert span.attributes["tramontane.api_key"] == "app-b"
    assert span.attributes["tramontane.streaming"] is True
    assert 0 < span.attributes["tramontane.time_to_first_token_s"] < 60
    assert span.attributes["gen_ai.usage.output_tokens"] == 16


def test_refused_and_unknown_model_requests_are_traced_with_their_status(
    sample_app: ServedApp, otel_collector: Collector
) -> None:
    refused_trace, _, headers = traced()
    with sample_app.client(key=None) as client:
        refused = client.post("/v1/chat/completions", json=chat(sample_app.model), headers=headers)
    assert refused.status_code == 401
    span = span_of(otel_collector, refused_trace)
    # Refused before routing: no route to name the span by (the path is an attribute).
    assert span.name == "POST"
    assert span.attributes["url.path"] == "/v1/chat/completions"
    assert span.attributes["http.response.status_code"] == 401
    assert span.attributes | identity(sample_app) == span.attributes
    assert "tramontane.api_key" not in span.attributes

    unknown_trace, _, headers = traced()
    with sample_app.client() as client:
        unknown = client.post("/v1/chat/completions", json=chat("no-such-model"), headers=headers)
    assert unknown.status_code == 404
    span = span_of(otel_collector, unknown_trace)
    assert span.name == "POST /v1/chat/completions"
    assert span.attributes["http.response.status_code"] == 404
    assert span.attributes["tramontane.model"] == "no-such-model"
    assert span.status != ERROR  # a client's mistake, not the server's (4xx)
