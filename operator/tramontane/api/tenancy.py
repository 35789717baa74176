"""tramontane.dev/v1alpha1 Tenant and ResidencyPolicy (both cluster-scoped).

A ResidencyPolicy says where a tenant's models may run and what they may talk to; a Tenant is an
isolated namespace with quotas, people and one ResidencyPolicy.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tramontane.api.base import API_VERSION, ApiModel, cel, immutable, rules, validations
from tramontane.api.conditions import Condition

DNS_LABEL = r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$"
REGION = r"^(\*|[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)$"
SOURCE_PATTERN = r"^(\*\*|(s3|gs|pvc|hf|oci)://[A-Za-z0-9*][A-Za-z0-9_.\-*/:@]*)$"
WILDCARD_ALONE = "'*' in self ? size(self) == 1 : true"


def _cidrs(alias: str, description: str) -> Any:
    return Field(
        default_factory=list,
        alias=alias,
        max_length=64,
        description=description,
        json_schema_extra={
            "items": {
                "type": "string",
                "maxLength": 43,
                **validations(
                    cel("isCIDR(self)", "must be a CIDR such as 10.20.0.0/16 or 2001:db8::/32")
                ),
            }
        },
    )


# https anywhere; plain http only to a cluster Service: name.namespace.svc[.cluster.local]
# (a longer suffix could be any public domain, which the cluster's DNS would forward).
TELEMETRY_ENDPOINT = (
    r"^(https://[a-z0-9.\-]+|http://[a-z0-9\-]+[.][a-z0-9\-]+[.]svc([.]cluster[.]local)?)"
    r"(:[0-9]{1,5})?(/.*)?$"
)


class ResidencyPolicySpec(ApiModel):
    """Where workloads may run, where weights may come from, what they may reach."""

    jurisdiction: str = Field(
        description="Label of the legal territory, e.g. EU, FR, DE (shown on dashboards).",
        pattern=r"^[A-Za-z][A-Za-z0-9\-]{0,31}$",
    )
    regions: list[str] = Field(
        min_length=1,
        max_length=64,
        description='Allowed values of topology.kubernetes.io/region; ["*"] allows any region.',
        json_schema_extra={
            "items": {"type": "string", "pattern": REGION, "maxLength": 63},
            **validations(cel(WILDCARD_ALONE, 'regions: "*" must be the only entry')),
        },
    )
    zones: list[str] = Field(
        default_factory=list,
        max_length=128,
        description="Allowed values of topology.kubernetes.io/zone; empty allows every zone of "
        "the allowed regions.",
        json_schema_extra={"items": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}},
    )
    model_sources: list[str] = Field(
        min_length=1,
        max_length=64,
        description="Allowed model and adapter URIs as glob patterns: `*` matches within one "
        "path segment, `**` across segments, e.g. s3://acme-eu-*/** or pvc://*/**; ** alone "
        "allows any source.",
        json_schema_extra={
            "items": {"type": "string", "pattern": SOURCE_PATTERN, "maxLength": 512}
        },
    )
    egress_cidrs: list[str] = _cidrs(
        "egressCIDRs",
        "Networks the tenant's workloads may open connections to (besides in-namespace "
        "traffic and DNS), e.g. the object store holding the weights.",
    )
    telemetry_endpoints: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Where the tenant's serving pods may export request spans (OTLP/HTTP): "
        "https://host[:port][/path], or plain http:// to a Service in the cluster "
        "(http://name.namespace.svc[.cluster.local][:port][/path]). The installation's "
        "serving OTLP endpoint is rendered into the tenant's pods only if it is one of these "
        "or under one's path. Empty: the tenant's pods export no spans.",
        json_schema_extra={
            "items": {"type": "string", "pattern": TELEMETRY_ENDPOINT, "maxLength": 512}
        },
    )  # fmt: skip


class ResidencyPolicy(ApiModel):
    """A data-residency policy that tenants reference."""

    KIND: ClassVar[str] = "ResidencyPolicy"
    PLURAL: ClassVar[str] = "residencypolicies"

    api_version: str = Field(default=API_VERSION, description="tramontane.dev/v1alpha1")
    kind: str = Field(default="ResidencyPolicy", description="ResidencyPolicy")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ResidencyPolicySpec = Field(description=ResidencyPolicySpec.__doc__)

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ResidencyPolicy:
        return cls.model_validate(
            {"metadata": dict(body.get("metadata", {})), "spec": body.get("spec", {})}
        )


class Quota(ApiModel):
    """Limits on what the tenant may deploy."""

    gpus: int = Field(
        ge=0,
        le=100_000,
        description="GPUs, counted at each deployment's autoscaling maximum "
        "(scaling.maxReplicas x accelerator.count).",
    )
    model_deployments: int = Field(
        default=10, ge=0, le=1000, description="Number of ModelDeployments."
    )


class Subjects(ApiModel):
    """People, as the cluster's authenticator names them."""

    groups: list[str] = Field(default_factory=list, max_length=64, description="Group names.")
    users: list[str] = Field(default_factory=list, max_length=256, description="User names.")


class Network(ApiModel):
    """Who may call the tenant's endpoints."""

    ingress_namespaces: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Namespaces (e.g. an API gateway's) allowed to reach the tenant's pods.",
        json_schema_extra={"items": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}},
    )
    ingress_cidrs: list[str] = _cidrs(
        "ingressCIDRs", "Networks allowed to reach the tenant's pods."
    )


class TenantSpec(ApiModel):
    """An isolated namespace with its residency policy, quota and people."""

    model_config = rules(
        cel(
            "(has(self.admins.groups) ? size(self.admins.groups) : 0) + "
            "(has(self.admins.users) ? size(self.admins.users) : 0) > 0",
            "admins must name at least one group or user",
            field_path=".admins",
        )
    )

    namespace: str = Field(
        description="The tenant's namespace (created and owned by the Tenant). Immutable.",
        pattern=DNS_LABEL,
        max_length=63,
        json_schema_extra=immutable("namespace", "Tenant"),
    )
    residency_policy: str = Field(
        description="Name of the ResidencyPolicy that binds this tenant.",
        pattern=DNS_LABEL,
        max_length=63,
    )
    quota: Quota = Field(description=Quota.__doc__)
    admins: Subjects = Field(
        description="Manage ModelDeployments and read pods, logs and events in the namespace."
    )
    members: Subjects = Field(
        default_factory=Subjects,
        description="Read ModelDeployments in the namespace.",
        json_schema_extra={"default": Subjects().to_wire()},
    )
    network: Network = Field(
        default_factory=Network,
        description=Network.__doc__,
        json_schema_extra={"default": Network().to_wire()},
    )


class TenantStatus(ApiModel):
    observed_generation: int = Field(default=0, description="metadata.generation observed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready: the namespace and its guard rails are in place.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    gpus_in_use: int = Field(
        default=0, description="GPUs counted against the quota (at autoscaling maximum)."
    )
    model_deployments: int = Field(default=0, description="ModelDeployments in the namespace.")


class Tenant(ApiModel):
    """A tenant: a business unit or customer with its own namespace."""

    KIND: ClassVar[str] = "Tenant"
    PLURAL: ClassVar[str] = "tenants"

    api_version: str = Field(default=API_VERSION, description="tramontane.dev/v1alpha1")
    kind: str = Field(default="Tenant", description="Tenant")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: TenantSpec = Field(description=TenantSpec.__doc__)
    status: TenantStatus | None = Field(default=None, description="Observed state.")

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Tenant:
        return cls.model_validate(
            {"metadata": dict(body.get("metadata", {})), "spec": body.get("spec", {})}
        )
