"""Entry point that the RayService's serveConfigV2 imports (`tramontane.serving.app:build_app`).

Ray Serve calls build_app with the application's `args`, which follow the operator's contract
(tramontane.api.serving.ServingArgs). It builds Ray Serve LLM's OpenAI-compatible application
(`ray.serve.llm`: an ingress deployment in front of LLMServer deployments running vLLM) and adds
what a multi-tenant platform needs on top of it:

- API keys of the tenant (tramontane.serving.auth), checked before anything else; 401 otherwise;
- usage metrics per tenant, deployment, model and key (tramontane.serving.usage);
- an OpenTelemetry span per request, when tracing is configured (tramontane.serving.tracing);
- LoRA adapters addressed by their own names (`finance-reports`, not Ray's `base:adapter`), each
  loaded from its own URI (Ray's loader only knows one bucket prefix for all adapters);
- `/healthz` (the app runs) and `/readyz` (the model's engine answers), without a key.

Ray Serve LLM's own builder (`build_openai_app`) is followed step for step; only the ingress
class, its FastAPI app (middleware) and the server class differ.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from typing import Any, ClassVar

from fastapi import FastAPI, Request  # type: ignore[import-not-found,unused-ignore]
from fastapi.responses import JSONResponse  # type: ignore[import-not-found,unused-ignore]
from opentelemetry import trace
from pydantic import BaseModel
from ray import serve  # type: ignore[import-not-found,unused-ignore]
from ray.llm._internal.common.dict_utils import (  # type: ignore[import-not-found,unused-ignore]
    maybe_apply_llm_deployment_config_defaults,
)
from ray.llm._internal.common.models import (  # type: ignore[import-not-found,unused-ignore]
    global_id_manager,
)
from ray.llm._internal.common.utils.cloud_utils import (  # type: ignore[import-not-found,unused-ignore]
    LoraMirrorConfig,
)
from ray.llm._internal.serve.core.configs.llm_config import (  # type: ignore[import-not-found,unused-ignore]
    DiskMultiplexConfig,
)
from ray.llm._internal.serve.core.configs.openai_api_models import (  # type: ignore[import-not-found,unused-ignore]
    ModelCard,
    ModelList,
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import (  # type: ignore[import-not-found,unused-ignore]
    DEFAULT_ENDPOINTS,
)
from ray.llm._internal.serve.core.ingress.ingress import (  # type: ignore[import-not-found,unused-ignore]
    init as init_fastapi_app,
)
from ray.llm._internal.serve.utils.lora_serve_utils import (  # type: ignore[import-not-found,unused-ignore]
    LoraModelLoader,
)
from ray.serve.llm import (  # type: ignore[import-not-found,unused-ignore]
    LLMConfig,
    LLMServer,
    build_llm_deployment,
)
from ray.serve.llm.ingress import (  # type: ignore[import-not-found,unused-ignore]
    OpenAiIngress,
    make_fastapi_ingress,
)

from tramontane.api.serving import ServingArgs, engine_deployment_name
from tramontane.serving import config, tracing
from tramontane.serving.auth import ApiKeyMiddleware, KeyStore, Receive, Scope, Send
from tramontane.serving.usage import (
    UNKNOWN,
    UsageMetrics,
    carries_text,
    is_usage_only,
    stream_usage,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0

_usage_metrics: UsageMetrics | None = None


def usage_metrics() -> UsageMetrics:
    """This process's metrics (Ray metric objects are created in the replica, not pickled)."""
    global _usage_metrics  # noqa: PLW0603
    if _usage_metrics is None:
        _usage_metrics = UsageMetrics()
    return _usage_metrics


def parse_args(args: dict[str, Any]) -> ServingArgs:
    """Validate the args Ray Serve passes in (the operator rendered them from the same model)."""
    return ServingArgs.model_validate(args)


# --- LoRA adapters by name ------------------------------------------------------------------


class AdapterLoader(LoraModelLoader):  # type: ignore[misc]
    """Loads the deployment's adapters by name from their own URIs (local folder or bucket)."""

    sources: ClassVar[dict[str, str]] = {}

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        name = lora_model_id.partition(":")[2]
        source = self.sources.get(name)
        if source is None:
            raise ValueError(f"unknown adapter {name!r}")
        if source.startswith("/"):
            # A mounted volume: vLLM reads the folder in place, nothing to copy.
            if lora_model_id not in self.disk_cache:
                self.disk_cache[lora_model_id] = DiskMultiplexConfig(
                    model_id=lora_model_id,
                    max_total_tokens=None,
                    local_path=source,
                    lora_assigned_int_id=global_id_manager.next(),
                )
            return self.disk_cache[lora_model_id]
        mirror = LoraMirrorConfig(
            lora_model_id=lora_model_id, bucket_uri=source, max_total_tokens=None
        )
        return await self.load_model(lora_model_id, mirror)


class TramontaneLLMServer(LLMServer):  # type: ignore[misc]
    """Ray Serve LLM's vLLM server, with the adapter loader above."""

    # An async constructor, as LLMServer's: Ray Serve awaits it (mypy only knows sync ones).
    async def __init__(  # type: ignore[misc]
        self, llm_config: Any, *, adapter_sources: dict[str, str] | None = None
    ) -> None:
        loader = type(
            "DeploymentAdapterLoader", (AdapterLoader,), {"sources": adapter_sources or {}}
        )
        await super().__init__(llm_config, model_downloader=loader)


# --- ingress --------------------------------------------------------------------------------


class UsageMiddleware:
    """Counts and traces every /v1 request by status code (401s and malformed bodies included).

    What only the ingress learns (the model asked for, the key's name, streaming, token counts,
    time to first token) reaches it through the request's state (`scope["state"]`).
    """

    def __init__(self, app: Any, *, tenant: str, deployment: str) -> None:
        self.app = app
        self.tenant = tenant
        self.deployment = deployment

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500
        span = self._start_span(scope)

        async def send_and_observe(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False, record_exception=True):
                await self.app(scope, receive, send_and_observe)
        finally:
            state = scope.get("state") or {}
            code = state.get("stream_error_code") or status
            self._end_span(span, scope, state, int(code))
            tags = {
                "tenant": self.tenant,
                "deployment": self.deployment,
                "model": state.get("model", UNKNOWN),
                "api_key": state.get("api_key", UNKNOWN),
                "code": str(code),
            }
            metrics = usage_metrics()
            metrics.requests.inc(1, tags)
            if int(code) >= 400:
                metrics.errors.inc(1, tags)

    def _start_span(self, scope: Scope) -> trace.Span:
        tracer = tracing.tracer()
        method = scope.get("method", "")
        if isinstance(tracer, trace.NoOpTracer):
            return trace.INVALID_SPAN  # tracing off: no context parsing, no attributes
        return tracer.start_span(
            # Renamed after routing to "{method} {route}"; before that the path is unmatched.
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
        route = getattr(scope.get("route"), "path", None)
        if route:
            span.update_name(f"{scope.get('method', '')} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", code)
        observed = {
            "tramontane.model": state.get("model"),
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


class StreamAccounting:
    """Usage metrics of one response; passes its streamed packets on, edited where needed."""

    def __init__(
        self,
        *,
        tags: dict[str, str],
        arrived: float,
        state: Any,
        hide_usage: bool,
        rename: tuple[str, str] | None,
    ) -> None:
        self.tags = tags
        self.arrived = arrived
        self.state = state
        self.hide_usage = hide_usage
        self.rename = rename
        self.first_text = True
        self.metrics = usage_metrics()

    def _note(self, **observed: Any) -> None:
        """For the request's span (UsageMiddleware reads the state when the response is sent)."""
        if self.state is not None:
            for key, value in observed.items():
                setattr(self.state, key, value)

    def count_response(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage.prompt_tokens or 0, self.tags)
            self.metrics.completion_tokens.inc(usage.completion_tokens or 0, self.tags)
            self._note(
                prompt_tokens=usage.prompt_tokens or 0,
                completion_tokens=usage.completion_tokens or 0,
            )

    def pass_packets(self, packets: list[Any]) -> list[Any]:
        kept = []
        for packet in packets:
            if not isinstance(packet, str):
                error = getattr(packet, "error", None)
                if error is not None and self.state is not None:
                    self.state.stream_error_code = getattr(error, "code", 500) or 500
                kept.append(packet)
                continue
            if self.first_text and carries_text(packet):
                self.first_text = False
                elapsed = time.perf_counter() - self.arrived
                self.metrics.time_to_first_token.observe(elapsed, self.tags)
                self._note(time_to_first_token=elapsed)
            text = packet if self.rename is None else packet.replace(*self.rename)
            counts = stream_usage(text)
            if counts is not None:
                self.metrics.prompt_tokens.inc(counts[0], self.tags)
                self.metrics.completion_tokens.inc(counts[1], self.tags)
                self._note(prompt_tokens=counts[0], completion_tokens=counts[1])
                if self.hide_usage and is_usage_only(text):
                    continue
            kept.append(text)
        return kept


def _stream_options_type(body: BaseModel) -> type[BaseModel] | None:
    field = type(body).model_fields.get("stream_options")
    if field is None:
        return None
    for candidate in (*typing.get_args(field.annotation), field.annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


class TramontaneIngress(OpenAiIngress):  # type: ignore[misc]
    """Ray Serve LLM's OpenAI ingress, with adapters by name, usage metrics and probes."""

    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        *,
        serving_args: dict[str, Any],
        lora_paths: dict[str, str] | None = None,
    ) -> None:
        # No bucket listing of adapters (lora_paths): the adapters are the ModelDeployment's.
        super().__init__(llm_deployments, model_cards)
        self._args = parse_args(serving_args)
        self._base = self._args.model.served_name
        self._adapters = [adapter.name for adapter in self._args.adapters]

    # Model names: clients use the base model's served name or an adapter's name; Ray Serve LLM
    # and vLLM know an adapter as `<base>:<adapter>` (its multiplexed model id).
    def _internal_model_id(self, model: str | None) -> str:
        if model is None or model == self._base:
            return self._base
        if model in self._adapters:
            return f"{self._base}:{model}"
        available = ", ".join([self._base, *self._adapters])
        raise OpenAIHTTPException(
            status_code=404,
            message=f"The model `{model}` does not exist. Models served here: {available}.",
            type="NotFoundError",
        )

    def _card(self, name: str) -> Any:
        base = self._model_cards[self._base]
        if name == self._base:
            return base
        return ModelCard(
            id=name,
            object="model",
            owned_by=base.owned_by,
            permission=list(base.permission),
            metadata={**base.metadata, "parent": self._base},
        )

    async def models(self) -> Any:
        return ModelList(data=[self._card(name) for name in (self._base, *self._adapters)])

    async def model_data(self, model: str) -> Any:
        if model == self._base or model in self._adapters:
            return self._card(model)
        raise OpenAIHTTPException(
            status_code=404, message=f"The model `{model}` does not exist.", type="NotFoundError"
        )

    async def _process_llm_request(
        self, body: Any, call_method: str, raw_request: Request | None = None
    ) -> Any:
        client_model = body.model or self._base
        if raw_request is not None:
            raw_request.state.model = client_model
            raw_request.state.arrived = time.perf_counter()
        # Refuses unknown names (Ray's `<base>:<adapter>` form included) before any engine work.
        body.model = self._internal_model_id(client_model)
        return await super()._process_llm_request(body, call_method, raw_request)

    async def _get_response(
        self, *, body: Any, call_method: str, raw_request: Request | None = None
    ) -> Any:
        state = raw_request.state if raw_request is not None else None
        client_model = getattr(state, "model", None) or body.model or self._base
        tags = {
            "tenant": self._args.tenant,
            "deployment": self._args.deployment,
            "model": client_model,
            "api_key": getattr(state, "api_key", UNKNOWN),
        }
        streaming = bool(getattr(body, "stream", False))
        if state is not None:
            state.streaming = streaming
        hide_usage = False
        if streaming and call_method in ("chat", "completions"):
            options = getattr(body, "stream_options", None)
            options_type = _stream_options_type(body)
            if (options is None or not options.include_usage) and options_type is not None:
                # Ask vLLM for the usage chunk to count tokens; the client did not ask for it.
                body.stream_options = options_type(include_usage=True)
                hide_usage = True
        accounting = StreamAccounting(
            tags=tags,
            arrived=getattr(state, "arrived", None) or time.perf_counter(),
            state=state,
            hide_usage=hide_usage,
            # Answers name the model as the client did (`finance-reports`, not `<base>:…`).
            rename=(f'"model":"{body.model}"', f'"model":"{client_model}"')
            if body.model != client_model
            else None,
        )
        async for item in super()._get_response(
            body=body, call_method=call_method, raw_request=raw_request
        ):
            if not streaming:
                if accounting.rename is not None and hasattr(item, "model"):
                    item.model = client_model
                accounting.count_response(item)
                yield item
                continue
            kept = accounting.pass_packets(item if isinstance(item, list) else [item])
            if kept:
                yield kept if isinstance(item, list) else kept[0]

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> Any:
        handle = self._default_serve_handles[self._base]
        try:
            await asyncio.wait_for(handle.check_health.remote(), READY_TIMEOUT_S)
        except Exception as error:
            return JSONResponse({"status": "unavailable", "reason": str(error)}, status_code=503)
        return {"status": "ready"}


ENDPOINTS = {
    **{name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")},
    "healthz": lambda app: app.get("/healthz"),
    "readyz": lambda app: app.get("/readyz"),
}


def fastapi_app(args: ServingArgs) -> FastAPI:
    """Ray Serve LLM's FastAPI app (error handling, request ids, HTTP metrics) + ours outside."""
    app = init_fastapi_app()
    if args.api_keys_path is not None:
        app.add_middleware(ApiKeyMiddleware, keys=KeyStore(args.api_keys_path))
    # Added last, so outermost: sees the 401s of the key check too.
    app.add_middleware(UsageMiddleware, tenant=args.tenant, deployment=args.deployment)
    return app


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application for one ModelDeployment."""
    parsed = parse_args(args)
    root = config.model_root()
    llm_config = LLMConfig(**config.llm_config(parsed, root))
    server = build_llm_deployment(
        llm_config,
        deployment_cls=TramontaneLLMServer,
        bind_kwargs={"adapter_sources": config.adapter_sources(parsed, root)},
        override_serve_options={"name": engine_deployment_name(parsed.model.served_name)},
    )
    ingress_options = maybe_apply_llm_deployment_config_defaults(
        TramontaneIngress.get_deployment_options([llm_config]), {}
    )
    ingress_options["ray_actor_options"] = config.INGRESS_ACTOR_OPTIONS
    ingress_cls = make_fastapi_ingress(
        TramontaneIngress, endpoint_map=ENDPOINTS, app=fastapi_app(parsed)
    )
    return serve.deployment(ingress_cls, **ingress_options).bind(
        llm_deployments={llm_config.model_id: server},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
        serving_args=parsed.to_wire(),
    )
