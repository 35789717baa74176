"""Residency and quota rules, as pure functions shared by admission and reconcile."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

from tramontane.api.conditions import Reason
from tramontane.api.labels import REGION_LABEL, ZONE_LABEL
from tramontane.api.tenancy import ResidencyPolicy, ResidencyPolicySpec, Tenant
from tramontane.api.v1alpha1 import ModelDeployment


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """`**` matches anything (slashes included), `*` anything within one path segment."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part) for part in parts
    )
    return re.compile(rf"^{regex}$")


def source_allowed(uri: str, patterns: Iterable[str]) -> bool:
    return any(_glob(pattern).match(uri) for pattern in patterns)


def disallowed_sources(md: ModelDeployment, policy: ResidencyPolicySpec) -> list[str]:
    """The model and adapter URIs of a deployment that the policy does not allow."""
    uris = [md.spec.model.uri, *(adapter.uri for adapter in md.spec.adapters)]
    return [uri for uri in uris if not source_allowed(uri, policy.model_sources)]


class ResidencyError(ValueError):
    """A deployment that its tenant's residency policy does not let run. `reason`: the
    ResidencyCompliant reason; `field`: the spec field at fault, if one is."""

    def __init__(self, reason: Reason, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


def governing_policy(
    md: ModelDeployment, tenant: Tenant, policy: ResidencyPolicy | None
) -> ResidencyPolicy:
    """The ResidencyPolicy `md` runs under: `policy`, its tenant's (None: it does not exist).
    Admission refuses and reconcile withdraws a deployment this raises ResidencyError for:
    a missing policy fails closed (without it we cannot know where the model may run), and
    every model and adapter source must be one the policy allows."""
    if policy is None:
        raise ResidencyError(
            Reason.RESIDENCY_POLICY_NOT_FOUND,
            f"ResidencyPolicy {tenant.spec.residency_policy} of tenant {tenant.name} does not "
            "exist",
        )
    denied = disallowed_sources(md, policy.spec)
    if denied:
        raise ResidencyError(
            Reason.MODEL_SOURCE_NOT_ALLOWED,
            f"{', '.join(denied)} not allowed by ResidencyPolicy {policy.name} of tenant "
            f"{tenant.name} (modelSources: {', '.join(policy.spec.model_sources)})",
            field="spec.model.uri/spec.adapters",
        )
    return policy


def telemetry_allowed(endpoint: str, policy: ResidencyPolicySpec) -> bool:
    """Whether the policy lets request spans go to `endpoint`: it is one of telemetryEndpoints,
    or under one's path (compared whole segments: https://otel.eu/v1 allows
    https://otel.eu/v1/traces, not https://otel.eu/v10 nor https://otel.eu.evil.com)."""
    for allowed in policy.telemetry_endpoints:
        base = allowed.rstrip("/")
        if endpoint.rstrip("/") == base or endpoint.startswith(base + "/"):
            return True
    return False


def region_requirements(policy: ResidencyPolicySpec) -> list[dict[str, object]]:
    """Node-selector requirements that keep a pod inside the policy's regions and zones."""
    requirements: list[dict[str, object]] = []
    if policy.regions != ["*"]:
        requirements.append({"key": REGION_LABEL, "operator": "In", "values": list(policy.regions)})
    if policy.zones:
        requirements.append({"key": ZONE_LABEL, "operator": "In", "values": list(policy.zones)})
    return requirements


def gpus_at_max_scale(md: ModelDeployment) -> int:
    """GPUs a deployment may hold at its autoscaling maximum: what the tenant quota counts."""
    return md.spec.scaling.max_replicas * md.spec.accelerator.gpus


def quota_violation(
    tenant: Tenant,
    others: Mapping[str, int],
    candidate: ModelDeployment,
    admitted: Mapping[str, int] | None = None,
) -> str | None:
    """Why `candidate` (new or changed) would exceed the tenant's quota, or None.

    `others`: GPUs at maximum scale (gpus_at_max_scale) of the tenant's other deployments by
    name (the candidate's previous version excluded); `admitted`: the same for deployments
    admitted but not among `others` yet (or admitted with more GPUs than `others` shows).
    """
    gpus = {name: used for name, used in others.items() if name != candidate.name}
    for name, admitted_gpus in (admitted or {}).items():
        if name != candidate.name:
            gpus[name] = max(gpus.get(name, 0), admitted_gpus)
    used = sum(gpus.values())
    wanted = gpus_at_max_scale(candidate)
    quota = tenant.spec.quota
    if used + wanted > quota.gpus:
        return (
            f"tenant {tenant.name} GPU quota exceeded: quota.gpus is {quota.gpus}, "
            f"{used} in use by {len(gpus)} other deployment(s), this one needs {wanted} "
            f"(scaling.maxReplicas {candidate.spec.scaling.max_replicas} x accelerator.count "
            f"{candidate.spec.accelerator.gpus})"
        )
    if len(gpus) + 1 > quota.model_deployments:
        return (
            f"tenant {tenant.name} quota exceeded: quota.modelDeployments is "
            f"{quota.model_deployments} and {len(gpus)} exist"
        )
    return None
