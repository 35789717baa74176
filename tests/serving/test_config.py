"""ServingArgs → Ray Serve LLM configuration, without starting an engine."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.llm import LLMConfig
from vllm.engine.arg_utils import AsyncEngineArgs

from tramontane.api.engine_args import ENGINE_ARGS
from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.serving import config

# Ray Serve LLM and vLLM are only in the serving environment; no engine.
pytestmark = pytest.mark.serving

SAMPLE = Path(__file__).resolve().parents[2] / "config" / "samples" / "modeldeployment.yaml"


def sample_args(**spec: Any) -> ServingArgs:
    body = yaml.safe_load(SAMPLE.read_text())
    body["spec"].update(spec)
    return ServingArgs.from_model_deployment(ModelDeployment.from_body(body))


def test_h100_sample_asks_ray_for_one_h100_per_replica_and_validates() -> None:
    args = sample_args()
    kwargs = config.llm_config(args, "/mnt/models")
    assert kwargs["accelerator_type"] == "H100"
    assert kwargs["placement_group_config"] == {
        "bundles": [{"CPU": 1, "GPU": 1}],
        "strategy": "STRICT_PACK",
    }
    engine = kwargs["engine_kwargs"]
    assert engine["max_model_len"] == 8192
    assert engine["gpu_memory_utilization"] == 0.9
    assert engine["enable_lora"] is True
    assert engine["max_loras"] == 2
    assert "enforce_eager" not in engine
    assert "ray_actor_options" not in kwargs["deployment_config"]  # Ray's default: 1 CPU
    assert kwargs["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 30,
        "downscale_delay_s": 300,
    }
    # Ray Serve LLM's own validation accepts it (model source is a bucket mirror).
    llm_config = LLMConfig(**kwargs)
    assert llm_config.model_id == "llama-3.1-8b-instruct"
    assert kwargs["model_loading_config"]["model_source"] == {
        "bucket_uri": "s3://acme-eu-models/meta-llama/Llama-3.1-8B-Instruct"
    }


def test_tensor_parallel_engine_gets_one_gpu_bundle_per_shard_on_one_node() -> None:
    args = sample_args(accelerator={"type": "H100", "count": 4}, engine={"tensorParallelSize": 4})
    placement = config.placement_group_config(args)
    assert placement["bundles"] == [{"CPU": 1, "GPU": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert placement["strategy"] == "STRICT_PACK"
    assert config.engine_kwargs(args)["tensor_parallel_size"] == 4


def test_cpu_replicas_run_eagerly_without_gpu_settings() -> None:
    args = sample_args(accelerator={"type": "CPU", "count": 0}, adapters=[])
    kwargs = config.llm_config(args, "/mnt/models")
    assert "accelerator_type" not in kwargs
    assert kwargs["placement_group_config"]["bundles"] == [{"CPU": 1}]
    # The replica actor asks no CPU of its own: one engine per core of a worker pod, not per two.
    assert kwargs["deployment_config"]["ray_actor_options"] == {"num_cpus": 0}
    assert kwargs["engine_kwargs"]["enforce_eager"] is True
    assert "gpu_memory_utilization" not in kwargs["engine_kwargs"]
    assert "lora_config" not in kwargs
    LLMConfig(**kwargs)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/prefix/model", {"bucket_uri": "s3://bucket/prefix/model"}),
        ("gs://bucket/model", {"bucket_uri": "gs://bucket/model"}),
        ("pvc://weights/llama/8b", "/mnt/models/weights/llama/8b"),
        ("pvc://weights", "/mnt/models/weights"),
        ("hf://meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ],
)
def test_model_uris_resolve_to_ray_serve_llm_sources(uri: str, expected: object) -> None:
    assert config.model_source(uri, "/mnt/models") == expected


def test_unsupported_model_scheme_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"oci:// is not supported"):
        config.model_source("oci://registry.example/models/llama:1", "/mnt/models")


def test_adapters_resolve_by_name_to_their_own_uris() -> None:
    args = sample_args(
        adapters=[
            {"name": "finance-reports", "uri": "s3://acme-eu-models/adapters/finance-v3"},
            {"name": "contracts-legal", "uri": "pvc://adapters/legal/v1"},
        ]
    )
    assert config.adapter_sources(args, "/mnt/models") == {
        "finance-reports": "s3://acme-eu-models/adapters/finance-v3",
        "contracts-legal": "/mnt/models/adapters/legal/v1",
    }


def test_extra_engine_args_reach_vllm_with_their_types() -> None:
    extra = {
        "max_num_batched_tokens": "4096",
        "kv_cache_dtype": "fp8",
        "enforce_eager": "true",
        "enable_chunked_prefill": "false",
        "cpu_offload_gb": "1.5",
        "block_size": "32",
    }
    engine = config.engine_kwargs(sample_args(engine={"extraArgs": extra}))
    assert engine["max_num_batched_tokens"] == 4096
    assert engine["kv_cache_dtype"] == "fp8"
    assert engine["enforce_eager"] is True
    assert engine["enable_chunked_prefill"] is False
    assert engine["cpu_offload_gb"] == 1.5
    assert engine["block_size"] == 32


def _vllm_engine_fields() -> dict[str, Any]:
    return {field.name: field for field in dataclasses.fields(AsyncEngineArgs)}


@pytest.mark.parametrize("name", sorted(ENGINE_ARGS))
def test_every_allowed_extra_arg_is_a_vllm_engine_argument_and_its_choices_are_vllms(
    name: str,
) -> None:
    """The allow-list follows the pinned vLLM: a renamed argument would be refused by the engine
    at start-up, after admission let it through."""
    fields = _vllm_engine_fields()
    assert name in fields, f"{name} is not an AsyncEngineArgs field of this vLLM"
    spec = ENGINE_ARGS[name]
    accepted = typing.get_args(fields[name].type)
    if spec.kind == "choice" and accepted and all(not isinstance(a, type) for a in accepted):
        assert {spec.parse(choice) for choice in spec.choices} <= set(accepted)


def test_engine_args_that_load_code_or_reach_the_network_are_not_allowed() -> None:
    fields = _vllm_engine_fields()
    dangerous = [
        "tokenizer", "trust_remote_code", "speculative_config", "otlp_traces_endpoint",
        "kv_transfer_config", "download_dir", "worker_cls", "worker_extension_cls",
        "hf_overrides", "generation_config", "model", "load_format", "enable_log_requests",
        "disable_log_stats", "hf_token", "allowed_local_media_path", "model_loader_extra_config",
    ]  # fmt: skip
    assert [name for name in dangerous if name in fields], "the list names real arguments"
    assert not set(dangerous) & set(ENGINE_ARGS)
