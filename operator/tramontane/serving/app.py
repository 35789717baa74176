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

The modules, one job each: `config` (ServingArgs → Ray Serve LLM's configuration, pure),
`server` (the replica), `adapters` (LoRA adapters by name), `front`, `auth`, `usage` and
`tracing` (the middleware), and `rayllm` (every name of Ray Serve LLM we use, its private ones
included: the one file a Ray upgrade touches).
"""

from __future__ import annotations

from typing import Any

from ray import serve  # type: ignore[import-not-found,unused-ignore]

from tramontane.api.serving import engine_deployment_name
from tramontane.serving import config
from tramontane.serving.rayllm import LLMConfig, build_llm_deployment
from tramontane.serving.server import TramontaneLLMServer


def build_app(args: dict[str, Any]) -> Any:
    """The Ray Serve application for one ModelDeployment: its engine replicas, each an ingress.

    No ingress request router is bound: HAProxy balances over the replicas itself (least
    connections), so no Python call precedes a request either."""
    parsed = config.parse_args(args)
    llm_config = LLMConfig(**config.llm_config(parsed, config.model_root()))
    return build_llm_deployment(
        llm_config,
        deployment_cls=serve.ingress()(TramontaneLLMServer),
        bind_kwargs={"serving_args": parsed.to_wire()},
        override_serve_options={"name": engine_deployment_name(parsed.model.served_name)},
    )
