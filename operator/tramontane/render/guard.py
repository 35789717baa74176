"""ValidatingAdmissionPolicies that keep tenants (and careless admins) off what decides tenancy.

Tenancy, residency and quota hang on a few things a tenant must not be able to change:
- the `tramontane.dev/*` labels of a namespace (which tenant owns it, which residency policy
  applies): only the operator sets them. A cluster admin removing or pointing one elsewhere by
  mistake is refused as well: a namespace changes tenant through its Tenant object;
- ServiceAccount tokens: a Secret of type `kubernetes.io/service-account-token` mints a token for
  any ServiceAccount of its namespace, KubeRay's per-cluster one included (which may patch the
  RayCluster). No such Secret is allowed in a tenant namespace, whoever asks;
- the Ray objects the operator renders: only the operator and KubeRay create them or change what
  they run. Anyone else (the Ray autoscaler's ServiceAccount, the garbage collector) may change
  replicas, scale-down lists and metadata only. Their pod images must be the installation's
  serving image(s), whoever writes them.

kube-apiserver enforces them itself, so they hold while the operator is down. The identities and
images are the installation's: the files hold placeholders that the chart fills in (see
`fill_placeholders`, which the tests use too). The __TRAMONTANE_*__ placeholders are not
environment variables (the operator's are in controller/settings.py).
"""

from __future__ import annotations

from typing import Any

from tramontane.api.labels import LABEL_PREFIX, PART_OF_LABEL, TENANT_LABEL
from tramontane.render.admission import ADMISSION_API, POD_SPECS

OPERATOR_PLACEHOLDER = "__TRAMONTANE_OPERATOR_IDENTITY__"
KUBERAY_PLACEHOLDER = "__TRAMONTANE_KUBERAY_IDENTITIES__"
IMAGES_PLACEHOLDER = "__TRAMONTANE_SERVING_IMAGES__"
SERVICE_ACCOUNT_TOKEN = "kubernetes.io/service-account-token"  # noqa: S105 (a Secret type)

_OPERATOR = f"request.userInfo.username == '{OPERATOR_PLACEHOLDER}'"
_KUBERAY = f"request.userInfo.username in '{KUBERAY_PLACEHOLDER}'.split(',')"
_TENANT_NAMESPACES = {"matchExpressions": [{"key": TENANT_LABEL, "operator": "Exists"}]}


def fill_placeholders(text: str, operator: str, kuberay: list[str], images: list[str]) -> str:
    """The guard policies for one installation: who the operator and KubeRay are, which images
    Ray pods may run. Identities are usernames as the API server sees them."""
    for value in (operator, *kuberay, *images):
        if not value or any(c in value for c in " ,'\"\\\n"):
            raise ValueError(f"not a plain identity or image reference: {value!r}")
    return (
        text.replace(OPERATOR_PLACEHOLDER, operator)
        .replace(KUBERAY_PLACEHOLDER, ",".join(kuberay))
        .replace(IMAGES_PLACEHOLDER, ",".join(images))
    )


def _meta(name: str) -> dict[str, Any]:
    return {"name": name, "labels": {PART_OF_LABEL: "tramontane"}}


def _policy(
    name: str,
    rules: list[dict[str, Any]],
    variables: list[dict[str, str]],
    validations: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": _meta(name),
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": rules},
            "variables": variables,
            "validations": [{**v, "reason": "Forbidden"} for v in validations],
        },
    }


def _binding(name: str, namespaces: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"policyName": name, "validationActions": ["Deny"]}
    if namespaces is not None:
        spec["matchResources"] = {"namespaceSelector": namespaces}
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": _meta(name),
        "spec": spec,
    }


def _rule(group: str, plural: str) -> dict[str, Any]:
    return {
        "apiGroups": [group],
        "apiVersions": ["*"],
        "resources": [plural],
        "operations": ["CREATE", "UPDATE"],
    }


def _ours(obj: str) -> str:
    """CEL: the tramontane.dev/* label keys of `obj` (null-safe, for oldObject on CREATE)."""
    return (
        f"{obj} == null || !has({obj}.metadata.labels) ? [] : "
        f"{obj}.metadata.labels.filter(k, k.startsWith('{LABEL_PREFIX}'))"
    )


def namespace_labels_policy() -> list[dict[str, Any]]:
    name = "tramontane-guard-namespace-labels"
    policy = _policy(
        name,
        [_rule("", "namespaces")],
        [
            {"name": "labels", "expression": _ours("object")},
            {"name": "before", "expression": _ours("oldObject")},
        ],
        [
            {
                "expression": f"{_OPERATOR} || (size(variables.labels) == size(variables.before)"
                " && variables.labels.all(k, k in variables.before && "
                "object.metadata.labels[k] == oldObject.metadata.labels[k]))",
                "messageExpression": "'namespace ' + object.metadata.name + ': its labels "
                f"{LABEL_PREFIX}* say which tenant owns it and which residency policy applies; "
                "only the Tramontane operator sets them (' + request.userInfo.username + ' may "
                "not add, change or remove them): change the Tenant instead'",
            }
        ],
    )
    return [policy, _binding(name, None)]


def service_account_token_policy() -> list[dict[str, Any]]:
    name = "tramontane-guard-service-account-tokens"
    policy = _policy(
        name,
        [_rule("", "secrets")],
        [],
        [
            {
                "expression": f"object.type != '{SERVICE_ACCOUNT_TOKEN}'",
                "messageExpression": "'Secret ' + object.metadata.name + ': type "
                f"{SERVICE_ACCOUNT_TOKEN} is not allowed in tenant namespaces (it would mint a "
                "token for a ServiceAccount the tenant does not own)'",
            }
        ],
    )
    return [policy, _binding(name, _TENANT_NAMESPACES)]


def _same(field: str, new: str = "object", old: str = "oldObject") -> str:
    """CEL: the optional `field` is the same in `new` and `old` (both absent counts)."""
    return (
        f"(has({new}.{field}) == has({old}.{field}) && "
        f"(!has({new}.{field}) || {new}.{field} == {old}.{field}))"
    )


def _same_run(kind: str) -> str:
    """CEL, on UPDATE: what the pods run is unchanged (replicas and metadata may change)."""
    if kind == "RayService":
        return "object.spec == oldObject.spec"
    group = "o.groupName == g.groupName && o.template == g.template && " + " && ".join(
        _same(f, "g", "o") for f in ("rayStartParams", "minReplicas", "maxReplicas")
    )
    return (
        "object.spec.headGroupSpec == oldObject.spec.headGroupSpec && "
        + " && ".join(
            _same(f"spec.{field}")
            for field in ("rayVersion", "enableInTreeAutoscaling", "autoscalerOptions")
        )
        + " && size(variables.groups) == size(variables.oldGroups) && "
        f"variables.groups.all(g, variables.oldGroups.exists(o, {group}))"
    )


def ray_object_policy(kind: str) -> list[dict[str, Any]]:
    group, plural, pod_specs = POD_SPECS[kind]
    name = f"tramontane-guard-{kind.lower()}"
    spec = "object.spec" if kind == "RayCluster" else "object.spec.rayClusterConfig"
    old_spec = spec.replace("object", "oldObject")
    images = (
        f"s.containers.all(c, c.image in '{IMAGES_PLACEHOLDER}'.split(',')) && "
        "(!has(s.initContainers) || "
        f"s.initContainers.all(c, c.image in '{IMAGES_PLACEHOLDER}'.split(',')))"
    )
    policy = _policy(
        name,
        [_rule(group, plural)],
        [
            {"name": "trusted", "expression": f"{_OPERATOR} || {_KUBERAY}"},
            {"name": "podSpecs", "expression": pod_specs},
            {
                "name": "groups",
                "expression": f"has({spec}.workerGroupSpecs) ? {spec}.workerGroupSpecs : []",
            },
            {
                "name": "oldGroups",
                "expression": f"oldObject != null && has({old_spec}.workerGroupSpecs) ? "
                f"{old_spec}.workerGroupSpecs : []",
            },
        ],
        [
            {
                "expression": "variables.trusted || request.operation == 'UPDATE'",
                "messageExpression": f"'{kind} ' + object.metadata.name + ': in tenant "
                f"namespaces {kind}s are made by the Tramontane operator and KubeRay only (from "
                "a ModelDeployment)'",
            },
            {
                "expression": "variables.trusted || request.operation != 'UPDATE' || "
                f"({_same_run(kind)})",
                "messageExpression": f"'{kind} ' + object.metadata.name + ': ' + "
                "request.userInfo.username + ' may change its replicas and metadata only; what "
                "its pods run is rendered by the Tramontane operator from the ModelDeployment'",
            },
            {
                "expression": f"variables.podSpecs.all(s, {images})",
                "messageExpression": f"'{kind} ' + object.metadata.name + ': Ray pods in tenant "
                f"namespaces run the serving image of the installation only: {IMAGES_PLACEHOLDER}'",
            },
        ],
    )
    return [policy, _binding(name, _TENANT_NAMESPACES)]


def render_guard_policies() -> list[dict[str, Any]]:
    """The policies and their bindings, with placeholders (see fill_placeholders)."""
    return [
        *namespace_labels_policy(),
        *service_account_token_policy(),
        *ray_object_policy("RayCluster"),
        *ray_object_policy("RayService"),
    ]
