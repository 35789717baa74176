"""The serving front (tramontane.serving.front) around a stand-in for vLLM's OpenAI app.

The real path (the front around vLLM's own app in a Ray Serve replica, behind HAProxy) is
tests/serving/test_openai_api.py; this checks, in a second, what the front does to requests and
responses: the routes, model names, the body bound, usage read from streamed and plain answers.
The stand-in is a Starlette app that answers as vLLM does (SSE events, one per token, then the
usage chunk when asked for, then [DONE]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from tramontane.serving.front import OpenAIFront

# starlette and Ray (tramontane.serving.usage) are only in the serving environment; no engine.
pytestmark = pytest.mark.serving

BASE = "tiny-llama"
ADAPTERS = ("finance-reports",)


@dataclass
class Recorder:
    """Records what the front counts (stands in for Ray's metric objects: ray.util.metrics
    needs a Ray worker to export; what is recorded is the same)."""

    values: dict[str, list[tuple[float, dict[str, str]]]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "values":
            raise AttributeError(name)
        recorder = self

        class Metric:
            def inc(self, value: float, tags: dict[str, str]) -> None:
                recorder.values.setdefault(name, []).append((value, tags))

            observe = inc

        return Metric()

    def total(self, name: str) -> float:
        return sum(value for value, _ in self.values.get(name, []))


def engine_events(model: str, tokens: int, *, usage: bool) -> list[bytes]:
    """A streamed chat completion as vLLM writes it: role chunk, one chunk per token, usage."""

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model}
    events = [
        event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]
    events += [
        event({**chunk, "choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
        for i in range(tokens)
    ]
    if usage:
        counts = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        events.append(event({**chunk, "choices": [], "usage": counts}))
    return [*events, b"data: [DONE]\n\n"]


class Engine:
    """The stand-in for vLLM's app: remembers the requests it got."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            self.requests.append({"raw": raw})
            return JSONResponse({"error": {"message": "JSON decode error", "code": 400}}, 400)
        self.requests.append(body)
        tokens = int(body.get("max_tokens", 3))
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = engine_events(body["model"], tokens, usage=include)
            # Two events split across body messages, as a socket may deliver them.
            joined = b"".join(events)
            parts = [joined[:37], joined[37:90], joined[90:]]

            async def stream() -> Any:
                for part in parts:
                    yield part

            return StreamingResponse(stream(), media_type="text/event-stream")
        return JSONResponse(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
                "usage": {
                    "prompt_tokens": 4,
                    "completion_tokens": tokens,
                    "total_tokens": 4 + tokens,
                },
            }
        )

    async def tokenize(self, request: Request) -> Response:
        return JSONResponse({"tokens": [1, 2]})


@pytest.fixture
def front() -> tuple[TestClient, Engine, Recorder, list[str]]:
    engine = Engine()
    inner = Starlette(
        routes=[
            Route("/v1/chat/completions", engine.chat, methods=["POST"]),
            Route("/tokenize", engine.tokenize, methods=["POST"]),
        ]
    )
    metrics = Recorder()
    loaded: list[str] = []

    async def load_adapter(name: str) -> None:
        loaded.append(name)

    async def ready() -> str | None:
        return None

    card = {"id": BASE, "object": "model", "owned_by": "tramontane", "metadata": {}}
    app = OpenAIFront(
        inner,
        tenant="acme",
        deployment="chat",
        base=BASE,
        adapters=ADAPTERS,
        model_cards=[card, {**card, "id": ADAPTERS[0]}],
        load_adapter=load_adapter,
        readiness=ready,
        metrics=lambda: metrics,  # type: ignore[arg-type,return-value]
        max_body_bytes=64 * 1024,
    )
    return TestClient(app), engine, metrics, loaded


def events_of(text: str) -> list[Any]:
    return [
        block.removeprefix("data: ")
        if block == "data: [DONE]"
        else json.loads(block.removeprefix("data: "))
        for block in text.split("\n\n")
        if block
    ]


def test_streamed_usage_asked_for_the_client_is_counted_and_hidden(front: Any) -> None:
    client, engine, metrics, _ = front
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200
    events = events_of(response.text)
    # vLLM was asked for the usage chunk; the client, who did not ask, does not see it.
    assert engine.requests[-1]["stream_options"] == {"include_usage": True}
    assert events[-1] == "[DONE]"
    assert all(isinstance(e, str) or e.get("choices") for e in events)
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-1]] == [
        " t0", " t1", " t2", " t3"
    ]  # fmt: skip
    assert metrics.total("completion_tokens") == 4
    assert metrics.total("prompt_tokens") == 5
    assert len(metrics.values["time_to_first_token"]) == 1
    (_, tags), *_ = metrics.values["completion_tokens"]
    assert tags == {"tenant": "acme", "deployment": "chat", "model": BASE, "api_key": "unknown"}


def test_streamed_usage_the_client_asked_for_is_passed_on(front: Any) -> None:
    client, _, metrics, _ = front
    body = {"model": BASE, "messages": [], "max_tokens": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    response = client.post("/v1/chat/completions", json=body)
    events = events_of(response.text)
    assert events[-2]["usage"]["completion_tokens"] == 2
    assert metrics.total("completion_tokens") == 2


def test_plain_answers_are_counted_and_passed_on_unchanged(front: Any) -> None:
    client, _, metrics, _ = front
    response = client.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 3})
    assert response.json()["usage"]["completion_tokens"] == 3
    assert metrics.total("completion_tokens") == 3
    assert "time_to_first_token" not in metrics.values  # streamed requests only


def test_adapters_are_loaded_by_their_own_name_before_the_engine_sees_them(front: Any) -> None:
    client, engine, metrics, loaded = front
    response = client.post("/v1/chat/completions", json={"model": "finance-reports"})
    assert response.status_code == 200
    assert loaded == ["finance-reports"]
    assert engine.requests[-1]["model"] == "finance-reports"
    assert metrics.values["completion_tokens"][0][1]["model"] == "finance-reports"


@pytest.mark.parametrize(
    "model",
    [f"{BASE}:finance-reports", "gpt-4o", "finance-reports "],
    ids=["base:adapter", "unknown", "space"],
)
def test_names_nobody_serves_get_404_and_never_reach_the_engine(front: Any, model: str) -> None:
    client, engine, _, loaded = front
    response = client.post("/v1/chat/completions", json={"model": model})
    assert response.status_code == 404
    error = response.json()["error"]
    assert model in error["message"] and BASE in error["message"]
    assert error["code"] == "model_not_found"
    assert engine.requests == [] and loaded == []


def test_a_body_over_the_bound_gets_413_without_being_read_whole(front: Any) -> None:
    client, engine, _, _ = front
    response = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": [{"content": "a" * 100_000}]}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert engine.requests == []


def test_malformed_bodies_reach_the_engine_as_sent_which_answers_400(front: Any) -> None:
    client, engine, metrics, _ = front
    response = client.post("/v1/chat/completions", content=b'{"model": [')
    assert response.status_code == 400
    assert engine.requests == [{"raw": b'{"model": ['}]
    assert "completion_tokens" not in metrics.values


def test_only_the_openai_routes_are_reachable(front: Any) -> None:
    client, _, _, _ = front
    assert client.post("/tokenize", json={}).status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.post("/v1/models").status_code == 405
    models = client.get("/v1/models").json()
    assert [card["id"] for card in models["data"]] == [BASE, "finance-reports"]
    assert client.get("/v1/models/finance-reports").json()["id"] == "finance-reports"
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_an_application_mounted_at_a_route_prefix_serves_the_same_routes(front: Any) -> None:
    """Ray Serve mounts an application at its route prefix: the ASGI path keeps the prefix and
    root_path names it."""
    client, _, _, _ = front
    mounted = TestClient(client.app, root_path="/team")
    assert mounted.get("/team/healthz").json() == {"status": "ok"}
    assert mounted.get("/team/v1/models").status_code == 200
    response = mounted.post("/team/v1/chat/completions", json={"model": BASE})
    assert response.status_code == 200, response.text
    assert mounted.get("/teamster/v1/models").status_code == 404
