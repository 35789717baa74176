"""The vLLM engine arguments a tenant may pass through `engine.extraArgs`: an allow-list.

vLLM takes well over a hundred arguments, and some of them load code or reach the network: a
tokenizer or draft model from anywhere, `trust_remote_code`, an OTLP endpoint, a KV-transfer
peer, a download directory, a worker class. Each one is a way around residency (`modelSources`,
`telemetryEndpoints`) or a way to run someone else's code, so only the arguments below pass: each
tunes batching, memory or scheduling of the engine that the ModelDeployment already describes,
and none names a model, a file, a class or an address. Arguments that change placement or
observability (`pipeline_parallel_size`, `disable_log_stats`) or put prompts in logs
(`enable_log_requests`) are left out on purpose.

Values are strings on the wire (Kubernetes maps are string-valued here); each is checked against
its argument's type in the CRD (CEL, so `kubectl apply` says which argument and which rule) and
again here when the operator and the serving app parse the object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

Kind = Literal["bool", "int", "number", "choice"]

_WHOLE = re.compile(r"^[0-9]{1,16}$")
_NUMBER = re.compile(r"^[0-9]{1,9}([.][0-9]{1,6})?$")  # no backslash: CEL strings


@dataclass(frozen=True)
class EngineArg:
    """One allowed vLLM argument: its type, its bounds or choices, and what it does."""

    kind: Kind
    does: str
    minimum: int = 0
    maximum: int = 0
    choices: tuple[str, ...] = ()

    def rule(self) -> str:
        """The rule a value must follow, in words (the error message's second half)."""
        if self.kind == "bool":
            return "must be true or false"
        if self.kind == "choice":
            return "must be one of " + ", ".join(self.choices)
        what = "a whole number" if self.kind == "int" else "a decimal number"
        return f"must be {what} from {self.minimum} to {self.maximum}"

    def accepts(self, value: str) -> bool:
        if self.kind == "bool":
            return value in ("true", "false")
        if self.kind == "choice":
            return value in self.choices
        pattern = _WHOLE if self.kind == "int" else _NUMBER
        # The pattern admits plain decimals only, so Decimal() cannot fail here.
        return bool(pattern.match(value)) and self.minimum <= Decimal(value) <= self.maximum

    def parse(self, value: str) -> Any:
        """The typed value vLLM takes (the value is known to be accepted)."""
        if self.kind == "bool":
            return value == "true"
        if self.kind == "int":
            return int(value)
        if self.kind == "number":
            return float(value)
        return int(value) if value.isdigit() else value

    def cel(self, name: str) -> str:
        """The CEL check of this argument's value, for `self` the extraArgs map."""
        value = f"self['{name}']"
        if self.kind == "bool":
            check = f"{value} in ['true', 'false']"
        elif self.kind == "choice":
            check = f"{value} in [{', '.join(repr(c) for c in self.choices)}]"
        elif self.kind == "int":
            check = (
                f"{value}.matches('{_WHOLE.pattern}') && int({value}) >= {self.minimum} "
                f"&& int({value}) <= {self.maximum}"
            )
        else:
            check = (
                f"{value}.matches('{_NUMBER.pattern}') && double({value}) >= "
                f"{float(self.minimum)} && double({value}) <= {float(self.maximum)}"
            )
        return f"!('{name}' in self) || ({check})"


_TOKENS = 1 << 20  # no context vLLM serves is longer than this
ENGINE_ARGS: dict[str, EngineArg] = {
    "max_num_batched_tokens": EngineArg(
        "int", "tokens one engine step may process (batching vs latency)", 1, _TOKENS
    ),
    "long_prefill_token_threshold": EngineArg(
        "int", "prompts longer than this are prefilled in chunks", 0, _TOKENS
    ),
    "enable_chunked_prefill": EngineArg("bool", "split long prefills across steps"),
    "async_scheduling": EngineArg("bool", "schedule the next step while one runs"),
    "scheduling_policy": EngineArg(
        "choice", "order of waiting requests", choices=("fcfs", "priority")
    ),
    "stream_interval": EngineArg("int", "tokens between streamed chunks", 1, 1024),
    "block_size": EngineArg(
        "choice", "tokens per KV-cache block", choices=("8", "16", "32", "64", "128")
    ),
    "kv_cache_dtype": EngineArg(
        "choice",
        "data type of the KV cache",
        choices=("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"),
    ),
    "kv_cache_memory_bytes": EngineArg(
        "int", "KV-cache size per GPU, instead of gpuMemoryUtilization", 1 << 20, 1 << 40
    ),
    "num_gpu_blocks_override": EngineArg("int", "KV-cache blocks, fixed", 1, 10_000_000),
    "cpu_offload_gb": EngineArg("number", "GiB of weights kept in CPU memory", 0, 1024),
    "prefix_caching_hash_algo": EngineArg(
        "choice",
        "hash of cached prefixes",
        choices=("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"),
    ),
    "enforce_eager": EngineArg("bool", "no CUDA graphs (less memory, slower)"),
    "disable_cascade_attn": EngineArg("bool", "no cascade attention"),
    "disable_sliding_window": EngineArg("bool", "no sliding-window attention"),
    "disable_custom_all_reduce": EngineArg("bool", "NCCL's all-reduce instead of vLLM's"),
    "enable_expert_parallel": EngineArg("bool", "expert parallelism for MoE models"),
    "max_lora_rank": EngineArg(
        "choice",
        "largest LoRA rank of the adapters",
        choices=("8", "16", "32", "64", "128", "256", "320", "512"),
    ),
    "max_cpu_loras": EngineArg("int", "adapters cached in CPU memory", 1, 1024),
    "fully_sharded_loras": EngineArg("bool", "shard LoRA computation across GPUs"),
    "max_logprobs": EngineArg("int", "most logprobs a request may ask for", 0, 1024),
    "seed": EngineArg("int", "random seed of sampling", 0, 2**31 - 1),
}


def allowed_list() -> str:
    return ", ".join(sorted(ENGINE_ARGS))


def not_allowed_message() -> str:
    return (
        "engine.extraArgs: only these vLLM arguments are allowed (none loads code, names a model "
        f"or reaches the network): {allowed_list()}"
    )


def engine_arg_errors(extra_args: dict[str, str]) -> list[str]:
    """Every broken rule of an extraArgs map, each naming its argument; [] when all is well."""
    errors: list[str] = []
    for name, value in sorted(extra_args.items()):
        spec = ENGINE_ARGS.get(name)
        if spec is None:
            errors.append(
                f"engine.extraArgs.{name} is not an allowed vLLM argument ({allowed_list()})"
            )
        elif not spec.accepts(value):
            errors.append(f"engine.extraArgs.{name} {spec.rule()} (got {value!r})")
    return errors


def engine_arg_cel_rules() -> list[dict[str, str]]:
    """The CRD's x-kubernetes-validations on the extraArgs map."""
    names = ", ".join(f"'{name}'" for name in sorted(ENGINE_ARGS))
    rules = [{"rule": f"self.all(name, name in [{names}])", "message": not_allowed_message()}]
    for name, spec in ENGINE_ARGS.items():
        rules.append({"rule": spec.cel(name), "message": f"engine.extraArgs.{name} {spec.rule()}"})
    return rules


def typed_engine_args(extra_args: dict[str, str]) -> dict[str, Any]:
    """The allowed arguments with the types vLLM takes (call after validation)."""
    return {name: ENGINE_ARGS[name].parse(value) for name, value in extra_args.items()}
