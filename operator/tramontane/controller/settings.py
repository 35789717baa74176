"""The operator's settings: every variable of its environment, in one typed model.

The Helm chart sets each of them (charts/tramontane/templates/deployment.yaml; a unit test keeps
the two in step). Unset, a variable takes the field's default, which is what a development run
on the local cluster wants. A bad value stops the operator at start with the variable named.

Not the operator's environment, and so not here: TRAMONTANE_MODEL_ROOT is read by the serving
app in the Ray pods (tramontane.serving.config); the __TRAMONTANE_*__ strings of render/guard.py
are placeholders the chart fills in its admission policies; POD_ID and OTEL_* are read by kopf
and OpenTelemetry under their own names; the TRAMONTANE_* variables of e2e/ configure the local
test cluster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from tramontane.render.rayservice import RenderOptions, scaled_quantity
from tramontane.render.tenant import TenantOptions


class KeepBlank:
    """Field marker: an empty value is a value (e.g. an empty list) where, unmarked, an empty
    or blank variable counts as unset and the field keeps its default."""


KEEP_BLANK = KeepBlank()
_RENDER = RenderOptions()
_TENANT = TenantOptions()


def _setting(variable: str, default: Any, doc: str, **rules: Any) -> Any:
    """A field read from `variable`, with its default, its one-line doc and its bounds."""
    return Field(default, alias=variable, description=doc, **rules)


def _variable(info: ValidationInfo) -> str:
    return str(TramontaneSettings.model_fields[str(info.field_name)].alias)


def _quantity(value: str, info: ValidationInfo) -> str:
    value = value.strip()
    try:
        scaled_quantity(value, 1)
    except ValueError:
        raise ValueError(
            f"{_variable(info)}={value!r} is not a Kubernetes quantity such as 500m, 4 or 16Gi"
        ) from None
    return value


def _comma_separated(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


Quantity = Annotated[str, AfterValidator(_quantity)]
CommaSeparated = Annotated[tuple[str, ...], BeforeValidator(_comma_separated), KEEP_BLANK]


class TramontaneSettings(BaseModel):
    """The operator's installation-wide settings; field aliases are the variable names."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True)

    # The process
    log_level: Annotated[str, KEEP_BLANK] = _setting(
        "TRAMONTANE_LOG_LEVEL", "INFO", "Python logging level of the operator."
    )
    metrics_host: Annotated[str, KEEP_BLANK] = _setting(
        "TRAMONTANE_METRICS_HOST", "0.0.0.0",  # noqa: S104 (the pod network)
        "Address of the metrics and probes endpoint.",
    )  # fmt: skip
    metrics_port: Annotated[int, KEEP_BLANK] = _setting(
        "TRAMONTANE_METRICS_PORT", 8080, "Port of the metrics and probes endpoint.", ge=0, le=65535
    )
    reconcile_workers: Annotated[int, KEEP_BLANK] = _setting(
        "TRAMONTANE_RECONCILE_WORKERS", 16,
        "Threads that reconcile (kopf's executor and the reconcile pool).", ge=1,
    )  # fmt: skip
    peering: str | None = _setting(
        "TRAMONTANE_PEERING", None,
        "ClusterKopfPeering shared by the replicas; unset: the operator runs alone.",
    )  # fmt: skip
    pod_namespace: str | None = _setting(
        "POD_NAMESPACE", None,
        "The operator pod's namespace (downward API); unset: not in a pod, no pod labelled.",
    )  # fmt: skip

    # The admission webhook
    webhook_host: Annotated[str, KEEP_BLANK] = _setting(
        "TRAMONTANE_WEBHOOK_HOST", "127.0.0.1",
        "Host name the API server calls the webhook by (the certificate's name).",
    )  # fmt: skip
    webhook_addr: Annotated[str | None, KEEP_BLANK] = _setting(
        "TRAMONTANE_WEBHOOK_ADDR", None,
        "Address the webhook listens on; unset: TRAMONTANE_WEBHOOK_HOST.",
    )  # fmt: skip
    webhook_port: Annotated[int, KEEP_BLANK] = _setting(
        "TRAMONTANE_WEBHOOK_PORT", 9443, "Port the webhook listens on.", ge=0, le=65535
    )
    webhook_cert: str | None = _setting(
        "TRAMONTANE_WEBHOOK_CERT", None,
        "Webhook TLS certificate file; unset (or no key): a self-signed one.",
    )  # fmt: skip
    webhook_key: str | None = _setting(
        "TRAMONTANE_WEBHOOK_KEY", None, "Webhook TLS private key file."
    )
    webhook_ca: Annotated[str | None, KEEP_BLANK] = _setting(
        "TRAMONTANE_WEBHOOK_CA", None,
        "CA bundle file of the webhook's certificate; unset: the certificate.",
    )  # fmt: skip
    webhook_config: Annotated[str, KEEP_BLANK] = _setting(
        "TRAMONTANE_WEBHOOK_CONFIG", "tramontane.dev",
        "ValidatingWebhookConfiguration kopf manages; empty: none (the chart owns it).",
    )  # fmt: skip

    # What ModelDeployments render to (RenderOptions)
    serving_image: str = _setting(
        "TRAMONTANE_SERVING_IMAGE", _RENDER.serving_image, "Image of the Ray pods."
    )
    cluster_domain: str = _setting(
        "TRAMONTANE_CLUSTER_DOMAIN", _RENDER.cluster_domain,
        "The cluster's DNS domain, in the endpoints of deployments.",
    )  # fmt: skip
    serving_otlp_endpoint: str | None = _setting(
        "TRAMONTANE_SERVING_OTLP_ENDPOINT", _RENDER.otlp_endpoint,
        "OTLP/HTTP endpoint for the serving app's spans; unset: it exports none.",
    )  # fmt: skip
    # Default pod sizes, for what a ModelDeployment's spec.resources leaves unset.
    head_cpu: Quantity = _setting("TRAMONTANE_HEAD_CPU", _RENDER.head_cpu, "CPU of a head pod.")
    head_memory: Quantity = _setting(
        "TRAMONTANE_HEAD_MEMORY", _RENDER.head_memory, "Memory of a head pod."
    )
    worker_cpu_per_gpu: Quantity = _setting(
        "TRAMONTANE_WORKER_CPU_PER_GPU", _RENDER.cpu_per_gpu, "CPU of a GPU worker, per GPU."
    )
    worker_memory_per_gpu: Quantity = _setting(
        "TRAMONTANE_WORKER_MEMORY_PER_GPU", _RENDER.memory_per_gpu,
        "Memory of a GPU worker, per GPU.",
    )  # fmt: skip
    cpu_worker_cpu: Quantity = _setting(
        "TRAMONTANE_CPU_WORKER_CPU", _RENDER.cpu_worker_cpu, "CPU of a CPU-only worker."
    )
    cpu_worker_memory: Quantity = _setting(
        "TRAMONTANE_CPU_WORKER_MEMORY", _RENDER.cpu_worker_memory, "Memory of a CPU-only worker."
    )
    autoscaler_cpu: Quantity = _setting(
        "TRAMONTANE_AUTOSCALER_CPU", _RENDER.autoscaler_cpu,
        "CPU of the Ray autoscaler sidecar of a head pod.",
    )  # fmt: skip
    autoscaler_memory: Quantity = _setting(
        "TRAMONTANE_AUTOSCALER_MEMORY", _RENDER.autoscaler_memory,
        "Memory of the Ray autoscaler sidecar of a head pod.",
    )  # fmt: skip
    serving_tolerations: tuple[dict[str, Any], ...] = _setting(
        "TRAMONTANE_SERVING_TOLERATIONS", _RENDER.pod_tolerations,
        "JSON list of tolerations added to the Ray pods (dedicated node pools).",
    )  # fmt: skip
    serving_node_selector: tuple[tuple[str, str], ...] = _setting(
        "TRAMONTANE_SERVING_NODE_SELECTOR", _RENDER.pod_node_selector,
        "JSON object of node labels the Ray pods select, on top of residency's.",
    )  # fmt: skip

    # Tenant namespaces (TenantOptions)
    monitoring_namespaces: CommaSeparated = _setting(
        "TRAMONTANE_MONITORING_NAMESPACES", _TENANT.monitoring_namespaces,
        "Comma-separated namespaces whose Prometheus may scrape tenant pods.",
    )  # fmt: skip
    api_server_cidrs: CommaSeparated = _setting(
        "TRAMONTANE_API_SERVER_CIDRS", _TENANT.api_server_cidrs,
        "Comma-separated CIDRs of the API server, for the Ray autoscaler's egress.",
    )  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TramontaneSettings:
        """The settings from `env` (the process's: os.environ); ValueError naming the variable
        and the rule for each bad value."""
        values: dict[str, str] = {}
        for field in cls.model_fields.values():
            variable = str(field.alias)
            if variable not in env:
                continue
            if not env[variable].strip() and KEEP_BLANK not in field.metadata:
                continue
            values[variable] = env[variable]
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ValueError("; ".join(_problem(each) for each in error.errors())) from None

    @field_validator("serving_tolerations", mode="before")
    @classmethod
    def _tolerations(cls, value: Any) -> Any:
        return _json(value, "TRAMONTANE_SERVING_TOLERATIONS", list)

    @field_validator("serving_node_selector", mode="before")
    @classmethod
    def _node_selector(cls, value: Any) -> Any:
        selector = _json(value, "TRAMONTANE_SERVING_NODE_SELECTOR", dict)
        if isinstance(selector, dict):
            return tuple(sorted((str(k), str(v)) for k, v in selector.items()))
        return selector

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            serving_image=self.serving_image,
            cluster_domain=self.cluster_domain,
            otlp_endpoint=self.serving_otlp_endpoint,
            head_cpu=self.head_cpu,
            head_memory=self.head_memory,
            cpu_per_gpu=self.worker_cpu_per_gpu,
            memory_per_gpu=self.worker_memory_per_gpu,
            cpu_worker_cpu=self.cpu_worker_cpu,
            cpu_worker_memory=self.cpu_worker_memory,
            autoscaler_cpu=self.autoscaler_cpu,
            autoscaler_memory=self.autoscaler_memory,
            pod_tolerations=self.serving_tolerations,
            pod_node_selector=self.serving_node_selector,
        )

    def tenant_options(self) -> TenantOptions:
        return TenantOptions(
            monitoring_namespaces=self.monitoring_namespaces,
            api_server_cidrs=self.api_server_cidrs,
        )


def _json(value: Any, variable: str, kind: type) -> Any:
    """A JSON list or object from the chart (its toJson), or a clear error naming the variable;
    anything but a string is left to the field's type."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{variable} is not JSON: {error}") from None
    if not isinstance(parsed, kind):
        raise ValueError(f"{variable} must be a JSON {'list' if kind is list else 'object'}")
    return parsed


def _problem(error: ErrorDetails) -> str:
    """One validation error as a sentence naming the variable (our validators' messages already
    do)."""
    message = str(error["msg"])
    if error["type"] == "value_error":
        return message.removeprefix("Value error, ")
    variable, *inside = error["loc"]
    where = "".join(f"[{part!r}]" for part in inside)
    return f"{variable}{where}={error['input']!r}: {message}"
