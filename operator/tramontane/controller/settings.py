"""The operator's installation-wide settings, read from its environment (set by the Helm chart).

Every variable is optional: unset, the defaults of RenderOptions and TenantOptions apply, which is
what a development run on the local cluster wants.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from tramontane.render.rayservice import RenderOptions
from tramontane.render.tenant import TenantOptions


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
    return dataclasses.replace(options, **updates)  # type: ignore[arg-type]


def tenant_options(env: Mapping[str, str] = os.environ) -> TenantOptions:
    options = TenantOptions()
    updates: dict[str, object] = {}
    if "TRAMONTANE_MONITORING_NAMESPACES" in env:
        updates["monitoring_namespaces"] = _list(env["TRAMONTANE_MONITORING_NAMESPACES"])
    if "TRAMONTANE_API_SERVER_CIDRS" in env:
        updates["api_server_cidrs"] = _list(env["TRAMONTANE_API_SERVER_CIDRS"])
    return dataclasses.replace(options, **updates)  # type: ignore[arg-type]
