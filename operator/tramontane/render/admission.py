"""ValidatingAdmissionPolicies that keep tenant workloads inside their residency regions.

kube-apiserver evaluates them itself (CEL), with the tenant's ResidencyPolicy as the param, for
every Pod, RayCluster and RayService in a tenant namespace — whoever creates it: the operator,
KubeRay, or a tenant admin going around both. The policies are static (policies/ holds them,
generated from here); the operator binds each ResidencyPolicy to the namespaces that use it.
"""

from __future__ import annotations

from typing import Any

from tramontane.api.base import API_VERSION, GROUP
from tramontane.api.labels import (
    PART_OF_LABEL,
    POLICY_LABEL,
    REGION_LABEL,
    TENANT_LABEL,
    ZONE_LABEL,
)
from tramontane.api.tenancy import ResidencyPolicy

ADMISSION_API = "admissionregistration.k8s.io/v1"

# Where the pod specs are in each kind (CEL expressions over `object`).
POD_SPECS: dict[str, tuple[str, str, str]] = {
    # kind: (api group, plural, CEL list of pod specs)
    "Pod": ("", "pods", "[object.spec]"),
    "RayCluster": (
        "ray.io",
        "rayclusters",
        "[object.spec.headGroupSpec.template.spec] + (has(object.spec.workerGroupSpecs) ? "
        "object.spec.workerGroupSpecs.map(g, g.template.spec) : [])",
    ),
    "RayService": (
        "ray.io",
        "rayservices",
        "[object.spec.rayClusterConfig.headGroupSpec.template.spec] + "
        "(has(object.spec.rayClusterConfig.workerGroupSpecs) ? "
        "object.spec.rayClusterConfig.workerGroupSpecs.map(g, g.template.spec) : [])",
    ),
}


def _pinned(label: str, allowed: str) -> str:
    """CEL: pod spec `s` can only land on nodes whose `label` is in `allowed`."""
    by_selector = (
        f"(has(s.nodeSelector) && '{label}' in s.nodeSelector && "
        f"s.nodeSelector['{label}'] in {allowed})"
    )
    terms = "s.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    by_affinity = (
        f"(has(s.affinity) && has(s.affinity.nodeAffinity) && "
        f"has(s.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution) && "
        f"size({terms}.nodeSelectorTerms) > 0 && {terms}.nodeSelectorTerms.all(t, "
        f"has(t.matchExpressions) && t.matchExpressions.exists(e, e.key == '{label}' && "
        f"e.operator == 'In' && has(e.values) && size(e.values) > 0 && "
        f"e.values.all(v, v in {allowed}))))"
    )
    return f"{by_selector} || {by_affinity}"


def policy_name(kind: str) -> str:
    return f"tramontane-residency-{kind.lower()}"


def _checked_operations(kind: str) -> list[str]:
    """A pod's placement (nodeSelector, affinity, nodeName) cannot change after it is created, and
    the scheduler binds through the pods/binding subresource, not an update: checking updates of
    pods would only refuse what cannot move them, such as a controller labelling a scheduled pod
    (its spec.nodeName is set by then; KubeRay labels the Ray head that serves). Templates of Ray
    objects can change, so their updates are checked too."""
    return ["CREATE"] if kind == "Pod" else ["CREATE", "UPDATE"]


def render_admission_policy(kind: str) -> dict[str, Any]:
    group, plural, pod_specs = POD_SPECS[kind]
    regions, zones = "params.spec.regions", "params.spec.zones"
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {
            "name": policy_name(kind),
            "labels": {PART_OF_LABEL: "tramontane"},
        },
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": API_VERSION, "kind": ResidencyPolicy.KIND},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [group],
                        "apiVersions": ["*"],
                        "resources": [plural],
                        "operations": _checked_operations(kind),
                    }
                ]
            },
            "variables": [{"name": "podSpecs", "expression": pod_specs}],
            "validations": [
                {
                    "expression": f"{regions} == ['*'] || variables.podSpecs.all(s, "
                    f"{_pinned(REGION_LABEL, regions)})",
                    "messageExpression": (
                        f"'{kind} ' + object.metadata.name + ' could run outside the regions "
                        "of ResidencyPolicy ' + params.metadata.name + ': every pod template "
                        f"needs required node affinity (or a nodeSelector) on {REGION_LABEL} "
                        "limited to ' + params.spec.regions.join(', ')"
                    ),
                    "reason": "Forbidden",
                },
                {
                    "expression": f"!has(params.spec.zones) || size({zones}) == 0 || "
                    f"variables.podSpecs.all(s, {_pinned(ZONE_LABEL, zones)})",
                    "messageExpression": (
                        f"'{kind} ' + object.metadata.name + ' could run outside the zones of "
                        f"ResidencyPolicy ' + params.metadata.name + ': pin {ZONE_LABEL} to ' + "
                        "params.spec.zones.join(', ')"
                    ),
                    "reason": "Forbidden",
                },
                {
                    # A pod created with spec.nodeName skips the scheduler and its affinity.
                    "expression": "variables.podSpecs.all(s, !has(s.nodeName) || s.nodeName == '')",
                    "messageExpression": (
                        f"'{kind} ' + object.metadata.name + ': spec.nodeName is not allowed in "
                        "tenant namespaces (it bypasses the residency node affinity)'"
                    ),
                    "reason": "Forbidden",
                },
            ],
        },
    }


def render_admission_policies() -> list[dict[str, Any]]:
    return [render_admission_policy(kind) for kind in POD_SPECS]


def render_bindings(policy: ResidencyPolicy) -> list[dict[str, Any]]:
    """Bind the residency admission policies, with `policy` as param, to its tenants' namespaces."""
    return [
        {
            "apiVersion": ADMISSION_API,
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {
                "name": f"{policy_name(kind)}-{policy.name}",
                "labels": {PART_OF_LABEL: "tramontane", POLICY_LABEL: policy.name},
                # No owner: garbage collection must not remove residency admission with the
                # policy (a deleted policy is refused while a Tenant uses it; with their param
                # gone the bindings refuse everything they match). The operator removes the
                # bindings of a policy nobody uses once it is deleted.
            },
            "spec": {
                "policyName": policy_name(kind),
                "paramRef": {"name": policy.name, "parameterNotFoundAction": "Deny"},
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {
                        "matchExpressions": [
                            {"key": TENANT_LABEL, "operator": "Exists"},
                            {"key": POLICY_LABEL, "operator": "In", "values": [policy.name]},
                        ]
                    }
                },
            },
        }
        for kind in POD_SPECS
    ]


__all__ = ["GROUP", "render_admission_policies", "render_bindings"]
