"""tramontane.dev/v1alpha1 ModelDeployment: one LLM served behind an OpenAI-compatible API.

These models are the single source of truth: `tramontane crds` generates crds/*.yaml from them
(descriptions, defaults, enums, bounds and CEL rules included), the operator parses objects with
them, and the serving contract (tramontane.api.serving) is derived from them.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator

from tramontane.api.base import API_VERSION, ApiModel, cel, immutable, rules, validations
from tramontane.api.conditions import Condition
from tramontane.api.engine_args import allowed_list, engine_arg_cel_rules, engine_arg_errors

# s3://bucket/key, gs://bucket/key, pvc://claim/path, hf://org/name: what the serving runtime can
# load (tramontane.serving.config.model_source), so anything else is refused at admission.
MODEL_URI_PATTERN = (
    r"^(s3|gs)://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$"
    r"|^pvc://[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(/[^\s]*)?$"
    r"|^hf://[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$"
)
# A path is matched against the policy's modelSources as written, and resolved by the runtime
# (a pvc:// path is a directory under the claim's mount): `..` would step out of what was matched,
# and `.` or empty segments make one source look like another. So URIs must be normal already.
NOT_NORMAL_URI = r"://.*(//|/\.\.?(/|$)|/$)"
NOT_NORMAL_URI_MESSAGE = (
    "must be a normal path: no '.' or '..' segments, no empty segments ('//'), no trailing '/'"
)


def _cel_string(text: str) -> str:
    """`text` inside a single-quoted CEL string literal (backslashes escaped)."""
    return text.replace("\\", "\\\\")


def _uri_field() -> Any:
    return Field(
        description=URI_DESCRIPTION,
        max_length=2048,
        pattern=MODEL_URI_PATTERN,
        json_schema_extra=validations(
            cel(f"!self.matches('{_cel_string(NOT_NORMAL_URI)}')", f"uri {NOT_NORMAL_URI_MESSAGE}")
        ),
    )


def _normal_uri(uri: str) -> str:
    if re.search(NOT_NORMAL_URI, uri):
        raise ValueError(f"uri {NOT_NORMAL_URI_MESSAGE}")
    return uri


URI_DESCRIPTION = (
    "Where the weights are: s3://bucket/prefix, gs://bucket/prefix, pvc://claim/path "
    "(mounted read-only) or hf://org/name."
)
MAX_NAME_LENGTH = 40  # leaves room for the suffixes KubeRay adds to RayCluster and pod names


class ModelSource(ApiModel):
    """The base model to serve."""

    model_config = rules(
        cel(
            "(has(self.servedName) ? self.servedName : '') == "
            "(has(oldSelf.servedName) ? oldSelf.servedName : '')",
            "model.servedName is immutable (clients call the model by this name): "
            "create a new ModelDeployment to rename it",
            field_path=".servedName",
        )
    )

    uri: str = _uri_field()
    _uri_is_normal = field_validator("uri")(_normal_uri)
    revision: str | None = Field(
        default=None,
        description="Pinned revision of the weights (commit, tag or object version). "
        "Pin it in production: the same ModelDeployment then always serves the same weights.",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/\-]*$",
    )
    served_name: str | None = Field(
        default=None,
        description="The model name clients pass in OpenAI requests. Defaults to the "
        "ModelDeployment's name. Immutable.",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/\-]*$",
    )


class Adapter(ApiModel):
    """A LoRA adapter served on top of the base model, selected by its name as the model."""

    name: str = Field(
        description="The model name clients use to select this adapter.",
        max_length=63,
        pattern=r"^[a-z0-9]([a-z0-9.\-]*[a-z0-9])?$",
    )
    uri: str = _uri_field()
    _uri_is_normal = field_validator("uri")(_normal_uri)


class DType(StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Quantization(StrEnum):
    AWQ = "awq"
    GPTQ = "gptq"
    FP8 = "fp8"
    BITSANDBYTES = "bitsandbytes"
    COMPRESSED_TENSORS = "compressed-tensors"


class EngineConfig(ApiModel):
    """vLLM engine settings."""

    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description="Maximum context length (prompt + output tokens). Defaults to the model's.",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=8,
        description="GPUs one engine shards the model over; at most accelerator.count.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        ge=0.1,
        le=0.98,
        description="Fraction of each GPU's memory vLLM may use (weights + KV cache).",
    )
    dtype: DType = Field(default=DType.AUTO, description="Weights and activations data type.")
    quantization: Quantization | None = Field(
        default=None, description="Quantization method of the weights, if quantized."
    )
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV cache of shared prompt prefixes."
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, le=4096, description="Maximum sequences batched per engine step."
    )
    extra_args: dict[str, Annotated[str, Field(max_length=64)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Further vLLM engine arguments, snake_case name → value as a string "
        '("true", "8192", "fp8"). Only arguments that tune batching, memory or '
        f"scheduling are allowed, none that loads code, names a model or reaches the network: "
        f"{allowed_list()}.",
        json_schema_extra=validations(*engine_arg_cel_rules()),
    )

    @field_validator("extra_args")
    @classmethod
    def _only_allowed_engine_args(cls, extra_args: dict[str, str]) -> dict[str, str]:
        errors = engine_arg_errors(extra_args)
        if errors:
            raise ValueError("; ".join(errors))
        return extra_args


class AcceleratorType(StrEnum):
    H100 = "H100"
    H200 = "H200"
    A100 = "A100"
    L40S = "L40S"
    CPU = "CPU"


class Accelerator(ApiModel):
    """The hardware each serving replica runs on."""

    model_config = rules(
        cel(
            "!has(self.count) || (self.type == 'CPU' ? self.count == 0 : "
            "self.count in [1, 2, 4, 8])",
            "accelerator.count must be 1, 2, 4 or 8 for GPU accelerators and 0 for CPU",
            field_path=".count",
        )
    )

    type: AcceleratorType = Field(
        default=AcceleratorType.H100,
        description="GPU model (H100, H200, A100, L40S) or CPU. Immutable: a different GPU "
        "type is a different capacity and quota decision.",
        json_schema_extra=immutable("accelerator.type", "ModelDeployment"),
    )
    count: int | None = Field(
        default=None,
        ge=0,
        le=8,
        description="GPUs per serving replica: 1, 2, 4 or 8 (default 1); 0 for CPU.",
    )

    @property
    def gpus(self) -> int:
        if self.type is AcceleratorType.CPU:
            return 0
        return 1 if self.count is None else self.count


class Scaling(ApiModel):
    """Autoscaling of serving replicas (Ray Serve) and of GPU workers (Ray autoscaler)."""

    model_config = rules(
        cel(
            "self.minReplicas <= self.maxReplicas",
            "scaling.minReplicas must be less than or equal to scaling.maxReplicas",
            field_path=".minReplicas",
        )
    )

    min_replicas: int = Field(default=1, ge=0, le=64, description="Fewest serving replicas.")
    max_replicas: int = Field(default=1, ge=1, le=64, description="Most serving replicas.")
    target_ongoing_requests: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="In-flight requests per replica the autoscaler aims for.",
    )
    upscale_delay_seconds: int = Field(
        default=30, ge=0, le=3600, description="Load must stay high this long before scaling up."
    )
    downscale_delay_seconds: int = Field(
        default=300, ge=0, le=86400, description="Load must stay low this long before scaling down."
    )


# A Kubernetes resource quantity without sign or exponent: 500m, 2, 1.5, 512Mi, 16Gi, 64G.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"


def _quantity(what: str, example: str) -> Any:
    return Field(
        default=None,
        max_length=32,
        pattern=QUANTITY_PATTERN,
        description=f"{what} of the pod (requests = limits), a Kubernetes quantity such as "
        f"{example}. Unset: the installation's default.",
        json_schema_extra=validations(
            cel(
                "quantity(self).isGreaterThan(quantity('0'))",
                f"{what.lower()} must be a quantity greater than zero",
            )
        ),
    )


class PodResources(ApiModel):
    """CPU and memory of one kind of Ray pod; GPUs come from `accelerator`."""

    cpu: str | None = _quantity("CPU", "500m or 4")
    memory: str | None = _quantity("Memory", "6Gi")


class Resources(ApiModel):
    """CPU and memory of the Ray pods."""

    head: PodResources = Field(
        default_factory=PodResources,
        description="The Ray head pod (GCS, Serve controller and proxy; no model replica).",
    )
    worker: PodResources = Field(
        default_factory=PodResources,
        description="Each worker pod, i.e. each serving replica (its vLLM engine and its "
        "accelerators). The default for GPU workers grows with accelerator.count.",
    )


class ModelDeploymentSpec(ApiModel):
    """What to serve, on what hardware, at what scale."""

    model_config = rules(
        cel(
            "!has(self.replicas) || (self.replicas >= self.scaling.minReplicas && "
            "self.replicas <= self.scaling.maxReplicas)",
            "replicas must be within scaling.minReplicas and scaling.maxReplicas",
            field_path=".replicas",
        ),
        cel(
            "self.accelerator.type == 'CPU' ? self.engine.tensorParallelSize == 1 : "
            "self.engine.tensorParallelSize <= "
            "(has(self.accelerator.count) ? self.accelerator.count : 1)",
            "engine.tensorParallelSize must not exceed accelerator.count (1 on CPU)",
            field_path=".engine.tensorParallelSize",
        ),
    )

    model: ModelSource = Field(description="The base model to serve.")
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=16,
        description="LoRA adapters (e.g. finance, legal) served alongside the base model.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    # Whole-object defaults in the CRD, so that an omitted section is filled in (and CEL rules
    # that read its fields see them).
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description=EngineConfig.__doc__,
        json_schema_extra={"default": EngineConfig().to_wire()},
    )
    accelerator: Accelerator = Field(
        default_factory=Accelerator,
        description=Accelerator.__doc__,
        json_schema_extra={"default": Accelerator().to_wire()},
    )
    scaling: Scaling = Field(
        default_factory=Scaling,
        description=Scaling.__doc__,
        json_schema_extra={"default": Scaling().to_wire()},
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="CPU and memory of the Ray pods. Unset values come from the installation's "
        "defaults (the Helm chart's serving.resources), so most deployments leave this out.",
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Desired serving replicas (the scale subresource: `kubectl scale`). The "
        "deployment starts from it and the autoscaler moves within scaling.minReplicas.."
        "maxReplicas. Unset: scaling.minReplicas.",
    )

    @property
    def desired_replicas(self) -> int:
        return self.scaling.min_replicas if self.replicas is None else self.replicas


class ModelDeploymentStatus(ApiModel):
    """Observed state, written by the operator."""

    observed_generation: int = Field(
        default=0, description="metadata.generation the status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Reconciled, ResidencyCompliant, ModelSourceReady, Available, PodsHealthy, "
        "Upgrading and the summary Ready.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    replicas: int = Field(default=0, description="Serving replicas that exist (GPU workers).")
    ready_replicas: int = Field(default=0, description="Serving replicas that are ready.")
    endpoint: str | None = Field(
        default=None, description="In-cluster URL of the OpenAI-compatible API."
    )
    ray_service_name: str | None = Field(default=None, description="The RayService serving this.")
    ray_cluster_name: str | None = Field(
        default=None,
        description="The RayCluster that serves (during an upgrade: the old one, until the new "
        "one runs).",
    )
    selector: str | None = Field(
        default=None, description="Label selector of the serving pods (scale subresource)."
    )


class ModelDeployment(ApiModel):
    """An LLM served behind an OpenAI-compatible API, inside its tenant's namespace."""

    KIND: ClassVar[str] = "ModelDeployment"
    PLURAL: ClassVar[str] = "modeldeployments"
    model_config = rules(
        cel(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
            "(KubeRay derives longer names from it)",
            field_path=".metadata.name",
        )
    )

    api_version: str = Field(default=API_VERSION, description="tramontane.dev/v1alpha1")
    kind: str = Field(default="ModelDeployment", description="ModelDeployment")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(description=ModelDeploymentSpec.__doc__)
    status: ModelDeploymentStatus | None = Field(
        default=None, description=ModelDeploymentStatus.__doc__
    )

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata["namespace"])

    @property
    def generation(self) -> int:
        return int(self.metadata.get("generation", 0))

    @property
    def served_name(self) -> str:
        return self.spec.model.served_name or self.name

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ModelDeployment:
        """Parse an object as the API server returns it (status and extra metadata tolerated)."""
        return cls.model_validate(
            {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": body.get("kind", cls.KIND),
                "metadata": dict(body.get("metadata", {})),
                "spec": body.get("spec", {}),
                "status": None,
            }
        )
