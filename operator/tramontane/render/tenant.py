"""Tenant → its namespace and guard rails (quota, limits, network policies, RBAC). Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tramontane.api.base import GROUP
from tramontane.api.conditions import Reason
from tramontane.api.labels import (
    JURISDICTION_LABEL,
    MANAGED_BY_LABEL,
    NAMESPACE_NAME_LABEL,
    PART_OF_LABEL,
    POD_SECURITY_AUDIT_LABEL,
    POD_SECURITY_ENFORCE_LABEL,
    POD_SECURITY_ENFORCE_VERSION_LABEL,
    POD_SECURITY_WARN_LABEL,
    POLICY_LABEL,
    TENANT_LABEL,
)
from tramontane.api.tenancy import ResidencyPolicy, Subjects, Tenant
from tramontane.render.owner import owner_reference
from tramontane.render.rayservice import GPU_RESOURCE, METRICS_PORT, SERVE_PORT

ADMIN_ROLE = "tramontane-tenant-admin"
MEMBER_ROLE = "tramontane-tenant-member"


@dataclass(frozen=True)
class TenantOptions:
    """Installation-wide settings for tenant namespaces."""

    monitoring_namespaces: tuple[str, ...] = ("monitoring",)
    dns_namespace: str = "kube-system"
    # The Ray autoscaler in each head pod talks to the API server; list its address(es) here.
    api_server_cidrs: tuple[str, ...] = ()
    default_limits: dict[str, str] = field(default_factory=lambda: {"cpu": "2", "memory": "4Gi"})
    default_requests: dict[str, str] = field(
        default_factory=lambda: {"cpu": "500m", "memory": "1Gi"}
    )


class TenancyError(ValueError):
    """A namespace whose tenancy cannot be trusted; `reason` is the condition reason."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def owning_tenant(namespace: str, labels: Mapping[str, str], claimants: Iterable[Tenant]) -> Tenant:
    """The Tenant that owns `namespace`, from the Tenant objects and never from labels alone.

    `claimants`: the Tenants whose spec.namespace is `namespace`. The owner is the one the
    operator's namespace label names, and the namespace's residency-policy label must be that
    Tenant's policy. Anything else fails closed (TenancyError): a namespace no Tenant claims, a
    label naming another tenant or none, a policy label that is not the Tenant's. Only the
    operator may write those labels (the tenant guard policies), and it restores them when they
    drift, so a disagreement is an attack or a mistake being repaired: nothing is placed or
    admitted on its word meanwhile.
    """
    candidates = {tenant.name: tenant for tenant in claimants}
    if not candidates:
        raise TenancyError(Reason.NO_TENANT, f"namespace {namespace} belongs to no Tenant")
    labelled = labels.get(TENANT_LABEL)
    owner = candidates.get(labelled or "")
    if owner is None:
        raise TenancyError(
            Reason.TENANCY_MISMATCH,
            f"namespace {namespace} is claimed by Tenant {', '.join(sorted(candidates))} but "
            f"labelled {TENANT_LABEL}={labelled or '(none)'}: refused until the operator "
            "restores the label",
        )
    policy = labels.get(POLICY_LABEL)
    if policy != owner.spec.residency_policy:
        raise TenancyError(
            Reason.TENANCY_MISMATCH,
            f"namespace {namespace} is labelled {POLICY_LABEL}={policy or '(none)'} but its "
            f"Tenant {owner.name} has residencyPolicy {owner.spec.residency_policy}: refused "
            "until the operator restores the label",
        )
    return owner


def tenant_labels(tenant: Tenant) -> dict[str, str]:
    return {
        MANAGED_BY_LABEL: "tramontane",
        PART_OF_LABEL: "tramontane",
        TENANT_LABEL: tenant.name,
    }


def _meta(tenant: Tenant, name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": tenant_labels(tenant),
        "ownerReferences": [owner_reference(tenant)],
    }
    if namespaced:
        meta["namespace"] = tenant.spec.namespace
    return meta


def render_namespace(tenant: Tenant, policy: ResidencyPolicy) -> dict[str, Any]:
    meta = _meta(tenant, tenant.spec.namespace, namespaced=False)
    meta["labels"] |= {
        POLICY_LABEL: policy.name,
        JURISDICTION_LABEL: policy.spec.jurisdiction,
        POD_SECURITY_ENFORCE_LABEL: "restricted",
        POD_SECURITY_ENFORCE_VERSION_LABEL: "latest",
        POD_SECURITY_WARN_LABEL: "restricted",
        POD_SECURITY_AUDIT_LABEL: "restricted",
    }
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def render_resource_quota(tenant: Tenant, upgrade_gpus: int = 0) -> dict[str, Any]:
    """The namespace's hard limits. `upgrade_gpus`: room for one upgrade in flight.

    The webhook keeps the tenant's deployments within quota.gpus at their autoscaling maximum.
    An engine change makes KubeRay start a new cluster beside the old one, which serves until the
    new one runs (zero downtime); for that overlap the namespace needs the GPUs of the largest
    deployment once more, or the new cluster's workers would be refused and the upgrade would
    never finish. Two upgrades at once queue: the second one's workers wait for the first one's
    old cluster to go.
    """
    quota = tenant.spec.quota
    # Pods: one head per deployment plus at most one worker per GPU, with room for rollouts
    # (KubeRay starts a new cluster beside the old one during an upgrade).
    pods = 2 * (quota.model_deployments + quota.gpus) + 10
    gpus = quota.gpus + max(0, min(upgrade_gpus, quota.gpus))
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta(tenant, "tramontane-tenant"),
        "spec": {
            # The ModelDeployment count is enforced by the webhook: an object-count quota on a CRD
            # blocks every create until kube-controller-manager's discovery has noticed the CRD.
            "hard": {f"requests.{GPU_RESOURCE}": str(gpus), "pods": str(pods)}
        },
    }


def render_limit_range(tenant: Tenant, options: TenantOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta(tenant, "tramontane-tenant"),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": dict(options.default_limits),
                    "defaultRequest": dict(options.default_requests),
                }
            ]
        },
    }


def _netpol(tenant: Tenant, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(tenant, name),
        "spec": {"podSelector": {}, **spec},
    }


def _namespaces(names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": list(names)}
            ]
        }
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def render_network_policies(
    tenant: Tenant, policy: ResidencyPolicy, options: TenantOptions
) -> list[dict[str, Any]]:
    """Default deny in and out, then one policy per allowed flow (named after it)."""
    network = tenant.spec.network
    policies = [
        _netpol(tenant, "default-deny", {"policyTypes": ["Ingress", "Egress"]}),
        _netpol(tenant, "allow-same-namespace", {
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [{"to": [{"podSelector": {}}]}],
        }),
        _netpol(tenant, "allow-dns", {
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{**_namespaces([options.dns_namespace]),
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }],
        }),
        _netpol(tenant, "allow-prometheus-scrape", {
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_namespaces(options.monitoring_namespaces)],
                         "ports": _tcp(METRICS_PORT)}],
        }),
    ]  # fmt: skip
    # Both allow-policies always exist, empty when nothing is allowed: a policy rendered only
    # when its list is non-empty stayed behind, still allowing the old flows, once the list was
    # emptied (nothing deletes a child that is no longer rendered).
    sources: list[dict[str, Any]] = []
    if network.ingress_namespaces:
        sources.append(_namespaces(network.ingress_namespaces))
    sources += [{"ipBlock": {"cidr": cidr}} for cidr in network.ingress_cidrs]
    policies.append(
        _netpol(
            tenant,
            "allow-ingress-sources",
            {
                "policyTypes": ["Ingress"],
                "ingress": [{"from": sources, "ports": _tcp(SERVE_PORT)}] if sources else [],
            },
        )
    )
    egress = list(policy.spec.egress_cidrs) + list(options.api_server_cidrs)
    policies.append(
        _netpol(
            tenant,
            "allow-egress-residency-policy",
            {
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": c}} for c in egress]}] if egress else [],
            },
        )
    )
    return policies


def _role(tenant: Tenant, name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(tenant, name),
        "rules": rules,
    }


READ = ["get", "list", "watch"]
WRITE = ["create", "update", "patch", "delete"]


def render_roles(tenant: Tenant) -> list[dict[str, Any]]:
    admin_rules = [
        {"apiGroups": [GROUP], "resources": ["modeldeployments", "modeldeployments/scale"],
         "verbs": READ + WRITE},
        {"apiGroups": [GROUP], "resources": ["modeldeployments/status"], "verbs": READ},
        {"apiGroups": [""], "resources": ["pods", "pods/log", "events", "services"],
         "verbs": READ},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": READ},
        # API-key and model-credential Secrets of their own namespace.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": READ + WRITE},
        {"apiGroups": ["ray.io"], "resources": ["rayservices", "rayclusters"], "verbs": READ},
    ]  # fmt: skip
    member_rules = [
        {"apiGroups": [GROUP], "resources": ["modeldeployments"], "verbs": READ},
    ]
    return [_role(tenant, ADMIN_ROLE, admin_rules), _role(tenant, MEMBER_ROLE, member_rules)]


def _subjects(subjects: Subjects) -> list[dict[str, str]]:
    api = "rbac.authorization.k8s.io"
    return [{"apiGroup": api, "kind": "Group", "name": g} for g in subjects.groups] + [
        {"apiGroup": api, "kind": "User", "name": u} for u in subjects.users
    ]


def render_role_bindings(tenant: Tenant) -> list[dict[str, Any]]:
    bindings = []
    for role, subjects in ((ADMIN_ROLE, tenant.spec.admins), (MEMBER_ROLE, tenant.spec.members)):
        bindings.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": _meta(tenant, role),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": _subjects(subjects),
            }
        )
    return bindings


def render_tenant(
    tenant: Tenant, policy: ResidencyPolicy, options: TenantOptions, upgrade_gpus: int = 0
) -> list[dict[str, Any]]:
    """Everything the operator keeps in place for a tenant, namespace first. `upgrade_gpus`: the
    GPUs of its largest deployment (see render_resource_quota)."""
    return [
        render_namespace(tenant, policy),
        render_resource_quota(tenant, upgrade_gpus),
        render_limit_range(tenant, options),
        *render_network_policies(tenant, policy, options),
        *render_roles(tenant),
        *render_role_bindings(tenant),
    ]
