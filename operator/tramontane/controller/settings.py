"""The operator's installation-wide settings, read from its environment (set by the Helm chart).

Every variable is optional: unset, the defaults of RenderOptions and TenantOptions apply, which is
what a development run on the local cluster wants.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from tramontane.render.rayservice import RenderOptions, scaled_quantity
from tramontane.render.tenant import TenantOptions

# Default Ray pod sizes (the chart's serving.resources): variable → RenderOptions field.
POD_SIZE_VARIABLES = {
    "TRAMONTANE_HEAD_CPU": "head_cpu",
    "TRAMONTANE_HEAD_MEMORY": "head_memory",
    "TRAMONTANE_WORKER_CPU_PER_GPU": "cpu_per_gpu",
    "TRAMONTANE_WORKER_MEMORY_PER_GPU": "memory_per_gpu",
    "TRAMONTANE_CPU_WORKER_CPU": "cpu_worker_cpu",
    "TRAMONTANE_CPU_WORKER_MEMORY": "cpu_worker_memory",
    "TRAMONTANE_AUTOSCALER_CPU": "autoscaler_cpu",
    "TRAMONTANE_AUTOSCALER_MEMORY": "autoscaler_memory",
}


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def render_options(env: Mapping[str, str] = os.environ) -> RenderOptions:
    options = RenderOptions()
    updates: dict[str, object] = {}
    if env.get("TRAMONTANE_SERVING_IMAGE"):
        updates["serving_image"] = env["TRAMONTANE_SERVING_IMAGE"]
    if env.get("TRAMONTANE_CLUSTER_DOMAIN"):
        updates["cluster_domain"] = env["TRAMONTANE_CLUSTER_DOMAIN"]
    if env.get("TRAMONTANE_SERVING_OTLP_ENDPOINT"):
        updates["otlp_endpoint"] = env["TRAMONTANE_SERVING_OTLP_ENDPOINT"]
    for variable, field in POD_SIZE_VARIABLES.items():
        if value := env.get(variable, "").strip():
            try:
                scaled_quantity(value, 1)
            except ValueError:
                raise ValueError(
                    f"{variable}={value!r} is not a Kubernetes quantity such as 500m, 4 or 16Gi"
                ) from None
            updates[field] = value
    if tolerations := env.get("TRAMONTANE_SERVING_TOLERATIONS", "").strip():
        updates["pod_tolerations"] = tuple(
            _json(tolerations, "TRAMONTANE_SERVING_TOLERATIONS", list)
        )
    if selector := env.get("TRAMONTANE_SERVING_NODE_SELECTOR", "").strip():
        parsed = _json(selector, "TRAMONTANE_SERVING_NODE_SELECTOR", dict)
        updates["pod_node_selector"] = tuple(sorted((str(k), str(v)) for k, v in parsed.items()))
    return dataclasses.replace(options, **updates)  # type: ignore[arg-type]


def _json(value: str, variable: str, kind: type) -> Any:
    """A JSON list or object from the chart (its toJson), or a clear error naming the variable."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{variable} is not JSON: {error}") from None
    if not isinstance(parsed, kind):
        raise ValueError(f"{variable} must be a JSON {'list' if kind is list else 'object'}")
    return parsed


def tenant_options(env: Mapping[str, str] = os.environ) -> TenantOptions:
    options = TenantOptions()
    updates: dict[str, object] = {}
    if "TRAMONTANE_MONITORING_NAMESPACES" in env:
        updates["monitoring_namespaces"] = _list(env["TRAMONTANE_MONITORING_NAMESPACES"])
    if "TRAMONTANE_API_SERVER_CIDRS" in env:
        updates["api_server_cidrs"] = _list(env["TRAMONTANE_API_SERVER_CIDRS"])
    return dataclasses.replace(options, **updates)  # type: ignore[arg-type]
