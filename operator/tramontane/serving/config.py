"""ServingArgs → Ray Serve LLM configuration: pure functions, no Ray import.

Everything that decides *what* runs (model source, vLLM engine arguments, autoscaling,
placement, LoRA) is computed here from the operator's contract, so it is unit-tested without the
engine and reviewed in one place; `tramontane.serving.app` only hands the result to
`ray.serve.llm`.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from tramontane.api.engine_args import typed_engine_args
from tramontane.api.serving import MODEL_ROOT, RAY_SERVE_ENV, ServingArgs

__all__ = ["RAY_SERVE_ENV"]  # re-exported: local Ray instances (tests, benchmarks) set it too

# Where `pvc://claim/path` URIs are found (api.serving.MODEL_ROOT in pods; local runs and tests
# point it at a folder of their own). The serving pods' environment, not the operator's: the
# operator's variables are its settings, controller/settings.py.
MODEL_ROOT_ENV = "TRAMONTANE_MODEL_ROOT"


def parse_args(args: dict[str, Any]) -> ServingArgs:
    """Validate the args Ray Serve passes in (the operator rendered them from the same model)."""
    return ServingArgs.model_validate(args)


def model_root() -> str:
    return os.environ.get(MODEL_ROOT_ENV, MODEL_ROOT)


def model_source(uri: str, root: str) -> str | dict[str, str]:
    """Where Ray Serve LLM / vLLM load weights from, for a ModelDeployment URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"model URI {uri!r} has no scheme (s3://, gs://, pvc://, hf://)")
    if scheme in ("s3", "gs"):
        # Ray Serve LLM mirrors the bucket prefix to local disk before the engine starts.
        return {"bucket_uri": uri}
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        return posixpath.normpath(posixpath.join(root, claim, path))
    if scheme == "hf":
        return rest
    raise ValueError(
        f"model URI scheme {scheme}:// is not supported by the serving runtime "
        "(supported: s3://, gs://, pvc://, hf://)"
    )


def adapter_sources(args: ServingArgs, root: str) -> dict[str, str]:
    """Adapter name → where its weights are (a local folder or a bucket URI)."""
    sources: dict[str, str] = {}
    for adapter in args.adapters:
        source = model_source(adapter.uri, root)
        sources[adapter.name] = source["bucket_uri"] if isinstance(source, dict) else source
    return sources


def engine_kwargs(args: ServingArgs) -> dict[str, Any]:
    """vLLM engine arguments (AsyncEngineArgs names)."""
    engine = args.engine
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine.dtype.value,
        "enable_prefix_caching": engine.enable_prefix_caching,
    }
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    if engine.quantization is not None:
        kwargs["quantization"] = engine.quantization.value
    if engine.max_num_seqs is not None:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if args.model.revision is not None and args.model.uri.startswith("hf://"):
        kwargs["revision"] = args.model.revision
    if args.accelerator.gpus:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        # On CPU, graph capture/compilation only lengthens start-up (minutes on 2 cores).
        kwargs["enforce_eager"] = True
    if args.adapters:
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = len(args.adapters)
    kwargs.update(typed_engine_args(engine.extra_args))
    return kwargs


def deployment_config(args: ServingArgs) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.autoscaling is not None:
        # Else the Serve config's deployment override sets it (see ServingArgs.autoscaling).
        config["autoscaling_config"] = args.autoscaling.serve_config()
    if not args.accelerator.gpus:
        # Ray Serve LLM adds the replica actor's CPU (1 by default) to the engine's bundle. On
        # CPU the engine's bundle already stands for the cores the engine computes on; the
        # actor only relays requests, so a worker pod of N cores hosts N engines, not N/2.
        config["ray_actor_options"] = {"num_cpus": 0}
    return config


def placement_group_config(args: ServingArgs) -> dict[str, Any]:
    """Resources of one replica: its engine's GPUs (one bundle per tensor-parallel shard)."""
    if not args.accelerator.gpus:
        return {"bundles": [{"CPU": 1}], "strategy": "STRICT_PACK"}
    shards = args.engine.tensor_parallel_size
    bundles: list[dict[str, float]] = [{"CPU": 1, "GPU": 1}]
    bundles += [{"GPU": 1} for _ in range(shards - 1)]
    # All shards of one engine on one node: tensor parallelism over the network is too slow.
    return {"bundles": bundles, "strategy": "STRICT_PACK"}


def llm_config(args: ServingArgs, root: str) -> dict[str, Any]:
    """Keyword arguments of ray.serve.llm.LLMConfig for this deployment."""
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": args.model.served_name,
            "model_source": model_source(args.model.uri, root),
        },
        "engine_kwargs": engine_kwargs(args),
        "deployment_config": deployment_config(args),
        "placement_group_config": placement_group_config(args),
        # vLLM's own metrics (TTFT, KV-cache usage, queue depth) through Ray's metrics agent.
        "log_engine_metrics": True,
    }
    if args.accelerator.gpus:
        config["accelerator_type"] = args.accelerator.type
    if args.adapters:
        # Adapters are resolved by name (tramontane.serving.adapters), not from one bucket prefix.
        config["lora_config"] = {"max_num_adapters_per_replica": len(args.adapters)}
    return config
