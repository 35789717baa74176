"""The serving front: pure ASGI middleware around vLLM's own OpenAI app, in the engine's replica.

HAProxy hands each HTTP request to an engine replica, which serves vLLM's FastAPI app itself
(Ray Serve's direct ingress): no Python hop sits between the client and the engine. What a
multi-tenant platform adds runs here, in the replica, as middleware (outermost first):

- `UsageMiddleware`: an OpenTelemetry span and the request counters, by status code, of every
  /v1 request (the 401s of the key check and the 404s of unknown models included);
- `tramontane.serving.auth.ApiKeyMiddleware`: the tenant's API keys;
- `OpenAIFront`: the routes clients may call (nothing else of vLLM's app is reachable), model
  names (adapters by their own names), a bounded request body, and usage accounting read from the
  response: the streamed events are parsed as JSON (one `json.loads` per event), the usage chunk
  that the front asked vLLM for is counted and dropped unless the client asked for it too.

Nothing here imports Ray: the replica hands in what only it knows (adapter loading, readiness).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import trace

from tramontane.serving import tracing
from tramontane.serving.auth import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    error_body,
    json_messages,
    route_path,
)
from tramontane.serving.usage import UNKNOWN, UsageMetrics

# A request body larger than this is refused (413) before it is read further: a chat request of
# the longest context vLLM serves is far smaller, and a bigger body would only cost the replica's
# CPU to buffer, parse and tokenize.
MAX_BODY_BYTES = 4 * 1024 * 1024

MAX_TRACED_NAME = 256  # of a model name nobody serves, in the request's span

# What clients may call; vLLM's other routes (/metrics, /tokenize, /v1/responses, …) stay
# unreachable, as they were behind the former ingress.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MODELS_PATH = "/v1/models"
MODEL_ROUTE = "/v1/models/{model}"

LoadAdapter = Callable[[str], Awaitable[None]]
Readiness = Callable[[], Awaitable[str | None]]  # None when ready, else why not


async def send_json(send: Send, status: int, payload: Any) -> None:
    for message in json_messages(status, json.dumps(payload).encode()):
        await send(message)


async def send_error(
    send: Send, status: int, message: str, *, type_: str, code: str | None = None
) -> None:
    """An error in the OpenAI API's shape (what vLLM and OpenAI's clients use)."""
    for part in json_messages(status, error_body(message, type_=type_, code=code)):
        await send(part)


def request_state(scope: Scope) -> dict[str, Any]:
    """What the inner layers learn about a request, for the outer ones (span, counters)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


class UsageMiddleware:
    """Counts and traces every /v1 request by status code (401s and malformed bodies included).

    What only the inner layers learn (the model asked for, the key's name, streaming, token
    counts, time to first token) reaches it through the request's state (`scope["state"]`).
    """

    def __init__(
        self, app: ASGIApp, *, tenant: str, deployment: str, metrics: Callable[[], UsageMetrics]
    ) -> None:
        self.app = app
        self.tenant = tenant
        self.deployment = deployment
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500
        state = request_state(scope)
        state["arrived"] = time.perf_counter()
        span = self._start_span(scope)

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True):
                await self.app(scope, receive, send_and_observe)
        finally:
            code = int(state.get("stream_error_code") or status)
            self._end_span(span, scope, state, code)
            tags = {
                "tenant": self.tenant,
                "deployment": self.deployment,
                "model": state.get("model", UNKNOWN),
                "api_key": state.get("api_key", UNKNOWN),
                "code": str(code),
            }
            metrics = self.metrics()
            metrics.requests.inc(1, tags)
            if code >= 400:
                metrics.errors.inc(1, tags)

    def _start_span(self, scope: Scope) -> trace.Span:
        tracer = tracing.tracer()
        method = scope.get("method", "")
        if isinstance(tracer, trace.NoOpTracer):
            return trace.INVALID_SPAN  # tracing off: no context parsing, no attributes
        return tracer.start_span(
            # Renamed to "{method} {route}" once the route is known.
            method,
            context=tracing.incoming_context(scope.get("headers") or []),
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
                "tramontane.tenant": self.tenant,
                "tramontane.deployment": self.deployment,
            },
        )

    @staticmethod
    def _end_span(span: trace.Span, scope: Scope, state: dict[str, Any], code: int) -> None:
        if not span.is_recording():
            return
        # The front names the routes it serves; a plain Starlette/FastAPI app sets scope["route"].
        route = state.get("route") or getattr(scope.get("route"), "path", None)
        if route:
            span.update_name(f"{scope.get('method', '')} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", code)
        observed = {
            "tramontane.model": state.get("model") or state.get("asked_model"),
            "tramontane.api_key": state.get("api_key"),
            "tramontane.streaming": state.get("streaming"),
            "tramontane.time_to_first_token_s": state.get("time_to_first_token"),
            "gen_ai.usage.input_tokens": state.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": state.get("completion_tokens"),
        }
        span.set_attributes({key: value for key, value in observed.items() if value is not None})
        if code >= 500:
            # Server spans: 5xx are the server's errors, 4xx the client's (semantic conventions).
            span.set_attribute("error.type", str(code))
            span.set_status(trace.StatusCode.ERROR)
        span.end()


class BodyTooLargeError(Exception):
    pass


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLargeError as soon as it is known to exceed `limit` bytes."""
    for name, value in scope.get("headers") or []:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLargeError
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLargeError
        parts.append(part)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then the client's own messages (its disconnect:
    vLLM aborts the engine's request when it sees it)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_content_length(
    headers: list[tuple[bytes, bytes]], length: int
) -> list[tuple[bytes, bytes]]:
    kept = [(name, value) for name, value in headers if name != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


def _carries_text(chunk: dict[str, Any]) -> bool:
    """Whether a streamed chat or completions chunk holds generated text."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if delta.get("content") or delta.get("reasoning_content"):
                return True
        elif choice.get("text"):
            return True
    return False


def _data_event(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an SSE `data:` event; None for anything else (`[DONE]` included)."""
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return None
    try:
        chunk = json.loads(event[6:])
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


class ResponseAccounting:
    """Reads one response on its way out: usage, time to first text, errors inside a stream.

    A streamed (SSE) body is cut into events; each `data:` event is parsed once as JSON. Events
    are passed on as the bytes vLLM wrote, except the usage chunk the front asked for on the
    client's behalf (`hide_usage`), which is dropped.
    """

    def __init__(
        self, send: Send, *, state: dict[str, Any], tags: dict[str, str], metrics: UsageMetrics,
        hide_usage: bool,
    ) -> None:  # fmt: skip
        self._send = send
        self.state = state
        self.tags = tags
        self.metrics = metrics
        self.hide_usage = hide_usage
        self.status = 0
        self.streamed = False
        self.usage: dict[str, Any] | None = None
        self._pending = b""  # an event's start whose end has not arrived yet
        self._json_parts: list[bytes] = []
        self._first_text = True

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers") or ():
                if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                    self.streamed = True
            await self._send(message)
            return
        if kind != "http.response.body" or self.status != 200:
            await self._send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.streamed:
            body = self._events(body, final=not more)
            if not body and more:
                return  # only a dropped usage chunk, or an event's first half
            message = {**message, "body": body}
        else:
            self._json_parts.append(body)
        await self._send(message)

    def _events(self, body: bytes, *, final: bool) -> bytes:
        data = self._pending + body if self._pending else body
        events = data.split(b"\n\n")
        self._pending = b"" if final else events.pop()
        kept = [event for event in events if event and self._keep(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def _keep(self, event: bytes) -> bool:
        """Notes what a streamed event says; False to drop it (the usage asked for us alone)."""
        chunk = _data_event(event)
        if chunk is None:
            return True  # a comment, [DONE], or not JSON: not ours to judge, passed on as it is
        error = chunk.get("error")
        if isinstance(error, dict):
            self.state["stream_error_code"] = error.get("code") or 500
            return True
        if self._first_text and _carries_text(chunk):
            self._first_text = False
            elapsed = time.perf_counter() - self.state.get("arrived", time.perf_counter())
            self.metrics.time_to_first_token.observe(elapsed, self.tags)
            self.state["time_to_first_token"] = elapsed
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return True
        self.usage = usage  # cumulative when vLLM sends it on every chunk: the last one counts
        return not (self.hide_usage and not chunk.get("choices"))

    def finish(self) -> None:
        """Counts the tokens of the response (once, when it has ended)."""
        if not self.streamed and self.status == 200 and self._json_parts:
            try:
                response = json.loads(b"".join(self._json_parts))
            except ValueError:
                response = None
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
        if self.usage is None:
            return
        prompt = self.usage.get("prompt_tokens") or 0
        completion = self.usage.get("completion_tokens") or 0
        if isinstance(prompt, int) and isinstance(completion, int):
            self.metrics.prompt_tokens.inc(prompt, self.tags)
            self.metrics.completion_tokens.inc(completion, self.tags)
            self.state["prompt_tokens"] = prompt
            self.state["completion_tokens"] = completion


class OpenAIFront:
    """The routes clients may call, model names and usage, in front of vLLM's app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenant: str,
        deployment: str,
        base: str,
        adapters: Sequence[str],
        model_cards: Sequence[dict[str, Any]],
        load_adapter: LoadAdapter,
        readiness: Readiness,
        metrics: Callable[[], UsageMetrics],
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.tenant = tenant
        self.deployment = deployment
        self.base = base
        self.adapters = frozenset(adapters)
        self.cards = {card["id"]: card for card in model_cards}
        self.load_adapter = load_adapter
        self.readiness = readiness
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = route_path(scope), scope.get("method", "GET")
        state = request_state(scope)
        if path == "/healthz":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            reason = await self.readiness()
            if reason is None:
                await send_json(send, 200, {"status": "ready"})
            else:
                await send_json(send, 503, {"status": "unavailable", "reason": reason})
        elif path in GENERATION_PATHS:
            state["route"] = path
            if method != "POST":
                await self._method_not_allowed(send, method, path)
            else:
                await self._generate(scope, receive, send, state)
        elif path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
            state["route"] = MODELS_PATH if path == MODELS_PATH else MODEL_ROUTE
            await self._models(send, method, path)
        else:
            await send_error(send, 404, f"Not found: {path}", type_="NotFoundError")

    async def _models(self, send: Send, method: str, path: str) -> None:
        if method != "GET":
            await self._method_not_allowed(send, method, path)
        elif path == MODELS_PATH:
            await send_json(send, 200, {"object": "list", "data": list(self.cards.values())})
        elif (card := self.cards.get(path[len(MODELS_PATH) + 1 :])) is not None:
            await send_json(send, 200, card)
        else:
            await self._unknown_model(send, path[len(MODELS_PATH) + 1 :])

    @staticmethod
    async def _method_not_allowed(send: Send, method: str, path: str) -> None:
        await send_error(
            send, 405, f"Method {method} is not allowed on {path}", type_="invalid_request_error"
        )

    async def _unknown_model(self, send: Send, model: str) -> None:
        served = ", ".join(self.cards)
        await send_error(
            send,
            404,
            f"The model `{model[:MAX_TRACED_NAME]}` does not exist. Models served here: {served}.",
            type_="NotFoundError",
            code="model_not_found",
        )

    async def _generate(
        self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any]
    ) -> None:
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
        except BodyTooLargeError:
            await send_error(
                send,
                413,
                f"The request body is larger than {self.max_body_bytes // (1024 * 1024)} MiB.",
                type_="invalid_request_error",
                code="request_too_large",
            )
            return
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        hide_usage = False
        if isinstance(request, dict):
            model = request.get("model")
            if model is None or model == self.base:
                state["model"] = self.base
            elif isinstance(model, str) and model in self.adapters:
                state["model"] = model
                try:
                    await self.load_adapter(model)
                except Exception as error:  # any loader failure is the same 503
                    await send_error(
                        send,
                        503,
                        f"The adapter `{model}` could not be loaded: {error}",
                        type_="ServiceUnavailableError",
                    )
                    return
            elif isinstance(model, str):
                # Not a metrics label (names nobody serves would grow the series without bound);
                # the request's span says what was asked.
                state["asked_model"] = model[:MAX_TRACED_NAME]
                await self._unknown_model(send, model)
                return
            streaming = request.get("stream") is True
            state["streaming"] = streaming
            options = request.get("stream_options")
            if (
                streaming
                and (options is None or isinstance(options, dict))
                and not (options or {}).get("include_usage")
            ):
                # Ask vLLM for the usage chunk to count tokens; the client did not ask for it.
                request["stream_options"] = {**(options or {}), "include_usage": True}
                hide_usage = True
                body = json.dumps(request).encode()
                scope["headers"] = _with_content_length(list(scope["headers"]), len(body))
        # Else malformed: vLLM's app answers it (400, in the OpenAI shape).
        tags = {
            "tenant": self.tenant,
            "deployment": self.deployment,
            "model": state.get("model", UNKNOWN),
            "api_key": state.get("api_key", UNKNOWN),
        }
        accounting = ResponseAccounting(
            send, state=state, tags=tags, metrics=self.metrics(), hide_usage=hide_usage
        )
        try:
            await self.app(scope, replay(body, receive), accounting.send)
        finally:
            accounting.finish()
