"""Entry point that the RayService's serveConfigV2 imports (`tramontane.serving.app:build_app`).

Ray Serve calls build_app with the application's `args`, which follow the operator's contract
(tramontane.api.serving.ServingArgs). The application is one Ray Serve LLM deployment of vLLM
engines (`ray.serve.llm.LLMServer`), and each of its replicas is the HTTP ingress itself: HAProxy
(Ray Serve's HAProxy ingress, `config.RAY_SERVE_ENV`) balances requests over the replicas'
own HTTP ports (least connections), and a replica serves vLLM's own OpenAI FastAPI app
(Ray Serve LLM's direct streaming). The token stream crosses no Python process between HAProxy
and the engine. Around vLLM's app, in the replica, what a multi-tenant platform needs
(tramontane.serving.front):

- API keys of the tenant (tramontane.serving.auth), checked before anything else; 401 otherwise;
- usage metrics per tenant, deployment, model and key (tramontane.serving.usage);
- an OpenTelemetry span per request, when tracing is configured (tramontane.serving.tracing);
- LoRA adapters addressed by their own names (`finance-reports`, not Ray's `base:adapter`), each
  loaded from its own URI (Ray's loader only knows one bucket prefix for all adapters) and
  registered in vLLM under that name, so answers name the model as the client did;
- `/healthz` (the app runs) and `/readyz` (the model's engine answers), without a key.

Serve's autoscaling still counts each replica's ongoing requests (direct ingress reports them).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from ray import serve  # type: ignore[import-not-found,unused-ignore]
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
    to_model_metadata,
)
from ray.llm._internal.serve.core.server.llm_server import (  # type: ignore[import-not-found,unused-ignore]
    _add_middleware_to_built_app,
)
from ray.llm._internal.serve.utils.lora_serve_utils import (  # type: ignore[import-not-found,unused-ignore]
    LoraModelLoader,
)
from ray.serve.llm import (  # type: ignore[import-not-found,unused-ignore]
    LLMConfig,
    LLMServer,
    build_llm_deployment,
)

from tramontane.api.serving import ServingArgs, engine_deployment_name
from tramontane.serving import config
from tramontane.serving.auth import ApiKeyMiddleware, KeyStore
from tramontane.serving.front import OpenAIFront, UsageMiddleware
from tramontane.serving.usage import UsageMetrics

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
    """Ray Serve LLM's vLLM server as the HTTP ingress: vLLM's app behind Tramontane's front."""

    # An async constructor, as LLMServer's: Ray Serve awaits it (mypy only knows sync ones).
    async def __init__(  # type: ignore[misc]
        self, llm_config: Any, *, serving_args: dict[str, Any]
    ) -> None:
        self._args = parse_args(serving_args)
        sources = config.adapter_sources(self._args, config.model_root())
        loader = type("DeploymentAdapterLoader", (AdapterLoader,), {"sources": sources})
        self._adapters_loaded: set[str] = set()
        self._adapter_lock = asyncio.Lock()
        await super().__init__(llm_config, model_downloader=loader)

    async def load_adapter(self, name: str) -> None:
        """Registers an adapter in vLLM under its own name, once per replica (first use)."""
        if name in self._adapters_loaded:
            return
        async with self._adapter_lock:
            if name in self._adapters_loaded:
                return
            # Ray's multiplexed loader (mirrors a bucket to local disk, LRU of the replica) knows
            # adapters as `<base>:<adapter>`; vLLM gets the adapter's own name.
            disk = await self._load_model(f"{self._args.model.served_name}:{name}")
            await self.engine.resolve_lora(disk.model_copy(update={"model_id": name}))
            self._adapters_loaded.add(name)

    async def readiness(self) -> str | None:
        try:
            await asyncio.wait_for(self.check_health(), READY_TIMEOUT_S)
        except Exception as error:  # any failure means not ready: say which
            return str(error) or type(error).__name__
        return None

    def _model_cards(self) -> list[dict[str, Any]]:
        base_name = self._args.model.served_name
        base: dict[str, Any] = to_model_metadata(base_name, self._llm_config).model_dump()
        cards = [base]
        for adapter in self._args.adapters:
            metadata = {**(base.get("metadata") or {}), "parent": base_name}
            cards.append({**base, "id": adapter.name, "metadata": metadata})
        return cards

    async def __serve_build_asgi_app__(self) -> Any:
        """The replica's HTTP app (Ray Serve's direct ingress): vLLM's, our middleware around it.

        Ray Serve LLM's own LoRA middleware is left out: adapters are resolved by name here."""
        app = await self.engine.build_asgi_app()
        args = self._args
        _add_middleware_to_built_app(
            app,
            OpenAIFront,
            tenant=args.tenant,
            deployment=args.deployment,
            base=args.model.served_name,
            adapters=[adapter.name for adapter in args.adapters],
            model_cards=self._model_cards(),
            load_adapter=self.load_adapter,
            readiness=self.readiness,
            metrics=usage_metrics,
        )
        if args.api_keys_path is not None:
            app.add_middleware(ApiKeyMiddleware, keys=KeyStore(args.api_keys_path))
        # Added last, so outermost: sees the 401s of the key check too.
        app.add_middleware(
            UsageMiddleware, tenant=args.tenant, deployment=args.deployment, metrics=usage_metrics
        )
        return app


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application for one ModelDeployment: its engine replicas, each an ingress.

    No ingress request router is bound: HAProxy balances over the replicas itself (least
    connections), so no Python call precedes a request either."""
    parsed = parse_args(args)
    llm_config = LLMConfig(**config.llm_config(parsed, config.model_root()))
    return build_llm_deployment(
        llm_config,
        deployment_cls=serve.ingress()(TramontaneLLMServer),
        bind_kwargs={"serving_args": parsed.to_wire()},
        override_serve_options={"name": engine_deployment_name(parsed.model.served_name)},
    )
