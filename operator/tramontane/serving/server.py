"""The engine replica: Ray Serve LLM's vLLM server, serving vLLM's app behind Tramontane's front.

Each replica is the HTTP ingress itself (Ray Serve's direct ingress, `tramontane.serving.app`):
it builds vLLM's OpenAI app and wraps it in the front's middleware (`tramontane.serving.front`,
`tramontane.serving.auth`), registers LoRA adapters in vLLM under their own names on first use
(`tramontane.serving.adapters`), and tells the front whether its engine answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tramontane.serving import config
from tramontane.serving.adapters import adapter_loader
from tramontane.serving.auth import ApiKeyMiddleware, KeyStore
from tramontane.serving.front import OpenAIFront, UsageMiddleware
from tramontane.serving.rayllm import LLMServer, add_middleware_to_built_app, to_model_metadata
from tramontane.serving.usage import UsageMetrics

READY_TIMEOUT_S = 5.0

_usage_metrics: UsageMetrics | None = None


def usage_metrics() -> UsageMetrics:
    """This process's metrics (Ray metric objects are created in the replica, not pickled)."""
    global _usage_metrics  # noqa: PLW0603
    if _usage_metrics is None:
        _usage_metrics = UsageMetrics()
    return _usage_metrics


class TramontaneLLMServer(LLMServer):  # type: ignore[misc]
    """Ray Serve LLM's vLLM server as the HTTP ingress: vLLM's app behind Tramontane's front."""

    # An async constructor, as LLMServer's: Ray Serve awaits it (mypy only knows sync ones).
    async def __init__(  # type: ignore[misc]
        self, llm_config: Any, *, serving_args: dict[str, Any]
    ) -> None:
        self._args = config.parse_args(serving_args)
        sources = config.adapter_sources(self._args, config.model_root())
        self._adapters_loaded: set[str] = set()
        self._adapter_lock = asyncio.Lock()
        await super().__init__(llm_config, model_downloader=adapter_loader(sources))

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
        add_middleware_to_built_app(
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
