"""A hostile tenant admin and a careless platform admin against the tenant guard policies.

The policies (policies/guard, installed by the chart) are applied here as the chart fills them in,
with the suite's identities: its operator runs as `tramontane-admin`, KubeRay as
`kuberay-operator`. Every attempt goes through the real kube-apiserver, as the user it names
(`--as`/`--as-group`); a platform admin is a member of system:masters who is not the operator.
Each refusal must name the rule.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import localcluster
from tests.kube import Kubectl, eventually
from tests.modeldeployments import sample
from tests.operator_process import OperatorProcess
from tests.tenants import MODELS_CLAIM, provision_tenant, remove_tenant
from tramontane.render.guard import fill_placeholders, render_guard_policies
from tramontane.render.rayservice import RenderOptions

OPERATOR = "tramontane-admin"
KUBERAY = localcluster.KUBERAY_USER
SERVING_IMAGE = RenderOptions().serving_image
REPO = Path(__file__).resolve().parents[2]
TOKEN_RULE = "type kubernetes.io/service-account-token is not allowed"  # noqa: S105
LABEL_RULE = "only the Tramontane operator sets them"
CREATE_RULE = "are made by the Tramontane operator and KubeRay only"
RUN_RULE = "may change its replicas and metadata only"
IMAGE_RULE = "run the serving image of the installation only"


def _guard_manifests() -> list[dict[str, Any]]:
    text = yaml.safe_dump_all(render_guard_policies())
    return list(yaml.safe_load_all(fill_placeholders(text, OPERATOR, [KUBERAY], [SERVING_IMAGE])))


@pytest.fixture(scope="module")
def guarded(crds: Kubectl, operator: OperatorProcess) -> Iterator[Kubectl]:
    """The guard policies in force (the suite's operator runs: it provisions the tenants)."""
    presets = crds
    presets.run("apply", "-f", str(REPO / "policies" / "presets"))
    manifests = _guard_manifests()
    # With this suite's identities, whoever applied them before (a chart install's helm).
    presets.apply(*manifests, take_over=True)
    probe_name = f"probe-{uuid.uuid4().hex[:6]}"
    labels = {"tramontane.dev/tenant": "nobody"}
    probe = {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": probe_name, "labels": labels}}  # fmt: skip
    admin = presets.as_user("platform-admin", "system:masters")

    def enforced() -> bool:
        result = admin.create(probe, check=False)
        if result.returncode == 0:
            presets.run("delete", "namespace", probe_name, "--wait=false")
            return False
        return True

    eventually(enforced, 30, "the guard policies to be enforced")
    yield presets
    for manifest in reversed(manifests):
        presets.run("delete", manifest["kind"], manifest["metadata"]["name"], "--ignore-not-found")


@pytest.fixture
def make_tenant(guarded: Kubectl) -> Iterator[Any]:
    created: list[str] = []

    def make(policy: str) -> str:
        name = f"tg-{uuid.uuid4().hex[:6]}"
        created.append(name)
        provision_tenant(guarded, name, policy)
        return name

    yield make
    for name in created:
        remove_tenant(guarded, name)


def _refused(result: subprocess.CompletedProcess[str], rule: str) -> None:
    assert result.returncode != 0, f"admitted:\n{result.stdout}"
    assert rule in result.stderr, f"the refusal does not name the rule {rule!r}:\n{result.stderr}"
    assert "Forbidden" in result.stderr or "denied request" in result.stderr, result.stderr


def _tenant_admin(cluster: Kubectl, tenant: str) -> Kubectl:
    return cluster.as_user("mallory", f"{tenant}-admins")


def _platform_admin(cluster: Kubectl) -> Kubectl:
    return cluster.as_user("platform-admin", "system:masters")


# --- ServiceAccount tokens ------------------------------------------------------------------


def _token_secret(namespace: str, account: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"steal-{uuid.uuid4().hex[:6]}",
            "namespace": namespace,
            "annotations": {"kubernetes.io/service-account.name": account},
        },
        "type": "kubernetes.io/service-account-token",
    }


@pytest.mark.parametrize("account", ["default", "kuberay-cluster", "tramontane"])
def test_a_tenant_admin_cannot_mint_a_service_account_token(
    guarded: Kubectl, make_tenant: Any, account: str
) -> None:
    tenant = make_tenant("eu")
    _refused(_tenant_admin(guarded, tenant).create(_token_secret(tenant, account), check=False),
             TOKEN_RULE)  # fmt: skip
    assert not [s for s in guarded.json("get", "secrets", "-n", tenant)["items"]
                if s["type"] == "kubernetes.io/service-account-token"]  # fmt: skip


def test_not_even_a_platform_admin_leaves_a_token_secret_in_a_tenant_namespace(
    guarded: Kubectl, make_tenant: Any
) -> None:
    tenant = make_tenant("eu")
    _refused(_platform_admin(guarded).create(_token_secret(tenant, "default"), check=False),
             TOKEN_RULE)  # fmt: skip


def test_api_key_secrets_are_still_the_tenants_to_manage(
    guarded: Kubectl, make_tenant: Any
) -> None:
    """The control: the guard refuses the token type, not the tenant's own Secrets."""
    tenant = make_tenant("eu")
    admin = _tenant_admin(guarded, tenant)
    admin.run("create", "secret", "generic", "llama-api-keys", "-n", tenant,
              "--from-literal=client=sk-1")  # fmt: skip
    admin.run("delete", "secret", "llama-api-keys", "-n", tenant)


def test_a_token_secret_outside_tenant_namespaces_is_not_our_business(guarded: Kubectl) -> None:
    namespace = f"plain-{uuid.uuid4().hex[:6]}"
    guarded.run("create", "namespace", namespace)
    try:
        guarded.create(_token_secret(namespace, "default"))
    finally:
        guarded.run("delete", "namespace", namespace, "--wait=false")


# --- namespace labels -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (["tramontane.dev/tenant-"], "removing the tenant label unpins its deployments"),
        (["tramontane.dev/residency-policy-"], "removing the policy label unbinds residency"),
        (["--overwrite", "tramontane.dev/residency-policy=unrestricted"], "a permissive policy"),
        (["--overwrite", "tramontane.dev/tenant=someone-else"], "handing it to another tenant"),
        (["tramontane.dev/extra=1"], "a new tramontane.dev label"),
    ],
)
def test_a_platform_admin_cannot_relabel_a_tenant_namespace_by_mistake(
    guarded: Kubectl, make_tenant: Any, change: list[str], why: str
) -> None:
    tenant = make_tenant("eu")
    before = guarded.json("get", "namespace", tenant)["metadata"]["labels"]
    result = _platform_admin(guarded).attempt("label", "namespace", tenant, *change)
    _refused(result, LABEL_RULE)
    assert guarded.json("get", "namespace", tenant)["metadata"]["labels"] == before, why


def test_a_namespace_cannot_be_made_to_look_like_a_tenants(
    guarded: Kubectl, make_tenant: Any
) -> None:
    tenant = make_tenant("eu")
    labels = {"tramontane.dev/tenant": tenant, "tramontane.dev/residency-policy": "unrestricted"}
    impostor = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": f"fake-{uuid.uuid4().hex[:6]}", "labels": labels}}  # fmt: skip
    _refused(_platform_admin(guarded).create(impostor, check=False), LABEL_RULE)
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    guarded.run("create", "namespace", plain)
    try:
        result = _platform_admin(guarded).attempt("label", "namespace", plain,
                      f"tramontane.dev/tenant={tenant}")  # fmt: skip
        _refused(result, LABEL_RULE)
    finally:
        guarded.run("delete", "namespace", plain, "--wait=false")


def test_other_labels_of_a_tenant_namespace_stay_free(guarded: Kubectl, make_tenant: Any) -> None:
    """The control: cost centres, team labels and the like are the platform team's."""
    tenant = make_tenant("eu")
    _platform_admin(guarded).run("label", "namespace", tenant, "cost-centre=4711")
    labels = guarded.json("get", "namespace", tenant)["metadata"]["labels"]
    assert labels["cost-centre"] == "4711" and labels["tramontane.dev/tenant"] == tenant


def test_the_operator_still_provisions_and_relabels_tenants(
    guarded: Kubectl, make_tenant: Any
) -> None:
    """The operator is the one identity that may: a policy change moves the namespace label."""
    tenant = make_tenant("eu")
    guarded.run("patch", "tenant", tenant, "--type=merge", "-p",
                json.dumps({"spec": {"residencyPolicy": "unrestricted"}}))  # fmt: skip

    def moved() -> bool:
        labels = guarded.json("get", "namespace", tenant)["metadata"]["labels"]
        return bool(labels.get("tramontane.dev/residency-policy") == "unrestricted")

    eventually(moved, 30, "the operator to move the namespace's policy label")


# --- Ray objects ----------------------------------------------------------------------------


@pytest.fixture
def deployed(guarded: Kubectl, make_tenant: Any) -> tuple[str, str, str]:
    """A tenant with a ModelDeployment, its RayService and the RayCluster KubeRay made of it:
    (namespace, RayService name, RayCluster name)."""
    tenant = make_tenant("eu")
    md = sample(tenant, "llama", adapters=[], scaling={"minReplicas": 1, "maxReplicas": 2})
    md["spec"]["model"]["uri"] = f"pvc://{MODELS_CLAIM}/llama-3.1-8b-instruct"
    guarded.apply(md)
    found: list[str] = []

    def cluster_made() -> bool:
        items = guarded.json("get", "rayclusters", "-n", tenant)["items"]
        found[:] = [i["metadata"]["name"] for i in items]
        return bool(found)

    eventually(cluster_made, 60, "KubeRay to make the RayCluster (as kuberay-operator)")
    return tenant, "llama", found[0]


def _as_cluster_account(cluster: Kubectl, namespace: str, raycluster: str) -> Kubectl:
    """The RayCluster's own ServiceAccount (the Ray autoscaler's), with every RBAC right: what
    a stolen token of it could do if RBAC were not the limit."""
    return cluster.as_user(f"system:serviceaccount:{namespace}:{raycluster}", "system:masters")


def _json_patch(
    client: Kubectl, kind: str, name: str, namespace: str, ops: list[Any]
) -> subprocess.CompletedProcess[str]:
    return client.attempt(
        "patch", kind, name, "-n", namespace, "--type=json", "-p", json.dumps(ops)
    )


def test_the_autoscalers_account_may_scale_the_cluster(
    guarded: Kubectl, deployed: tuple[str, str, str]
) -> None:
    namespace, _, raycluster = deployed
    account = _as_cluster_account(guarded, namespace, raycluster)
    result = _json_patch(account, "raycluster", raycluster, namespace, [
        {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 2},
        {"op": "replace", "path": "/spec/workerGroupSpecs/0/scaleStrategy",
         "value": {"workersToDelete": []}},
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/spec/workerGroupSpecs/0/template/spec/containers/0/image", "attacker.example/miner:1"),
        ("/spec/workerGroupSpecs/0/template/spec/containers/0/command", ["sh", "-c", "curl evil"]),
        ("/spec/headGroupSpec/template/spec/containers/0/env", [{"name": "X", "value": "1"}]),
        ("/spec/workerGroupSpecs/0/maxReplicas", 64),
        ("/spec/workerGroupSpecs/0/rayStartParams", {"num-gpus": "8"}),
        ("/spec/autoscalerOptions", {"image": "attacker.example/autoscaler:1"}),
    ],
)
def test_a_stolen_cluster_token_cannot_change_what_the_pods_run(
    guarded: Kubectl, deployed: tuple[str, str, str], path: str, value: Any
) -> None:
    namespace, _, raycluster = deployed
    before = guarded.json("get", "raycluster", raycluster, "-n", namespace)["spec"]
    account = _as_cluster_account(guarded, namespace, raycluster)
    result = _json_patch(account, "raycluster", raycluster, namespace,
                         [{"op": "replace" if "autoscalerOptions" not in path else "add",
                           "path": path, "value": value}])  # fmt: skip
    assert result.returncode != 0, f"admitted: {path}"
    assert RUN_RULE in result.stderr or IMAGE_RULE in result.stderr, result.stderr
    after = guarded.json("get", "raycluster", raycluster, "-n", namespace)["spec"]
    after["workerGroupSpecs"][0].pop("replicas", None)
    before["workerGroupSpecs"][0].pop("replicas", None)
    assert after == before


def test_a_new_worker_group_cannot_be_smuggled_in(
    guarded: Kubectl, deployed: tuple[str, str, str]
) -> None:
    namespace, _, raycluster = deployed
    current = guarded.json("get", "raycluster", raycluster, "-n", namespace)
    group = copy.deepcopy(current["spec"]["workerGroupSpecs"][0])
    group["groupName"] = "extra"
    add = [{"op": "add", "path": "/spec/workerGroupSpecs/-", "value": group}]
    result = _json_patch(_platform_admin(guarded), "raycluster", raycluster, namespace, add)
    _refused(result, RUN_RULE)


def test_nobody_but_kuberay_and_the_operator_makes_ray_objects(
    guarded: Kubectl, deployed: tuple[str, str, str]
) -> None:
    namespace, rayservice, raycluster = deployed
    made = guarded.json("get", "raycluster", raycluster, "-n", namespace)
    copycat = {"apiVersion": made["apiVersion"], "kind": "RayCluster", "spec": made["spec"],
               "metadata": {"name": "copycat", "namespace": namespace}}  # fmt: skip
    _refused(_platform_admin(guarded).create(copycat, check=False), CREATE_RULE)
    service = guarded.json("get", "rayservice", rayservice, "-n", namespace)
    twin = {"apiVersion": service["apiVersion"], "kind": "RayService", "spec": service["spec"],
            "metadata": {"name": "twin", "namespace": namespace}}  # fmt: skip
    _refused(_platform_admin(guarded).create(twin, check=False), CREATE_RULE)


def test_the_rayservice_spec_is_the_operators(
    guarded: Kubectl, deployed: tuple[str, str, str]
) -> None:
    namespace, rayservice, _ = deployed
    admin = _platform_admin(guarded)
    result = _json_patch(admin, "rayservice", rayservice, namespace, [
        {"op": "replace", "path": "/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/"
         "containers/0/image", "value": "attacker.example/serving:1"},
    ])  # fmt: skip
    assert result.returncode != 0 and (RUN_RULE in result.stderr or IMAGE_RULE in result.stderr)
    # Metadata stays free (a label, an annotation: tooling does that).
    admin.run("label", "rayservice", rayservice, "-n", namespace, "audited=yes")


def test_kuberay_itself_cannot_run_another_image(
    guarded: Kubectl, deployed: tuple[str, str, str]
) -> None:
    """Images are checked whoever writes: a RayCluster made as KubeRay with a foreign image."""
    namespace, _, raycluster = deployed
    made = guarded.json("get", "raycluster", raycluster, "-n", namespace)
    spec = copy.deepcopy(made["spec"])
    spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "evil/ray:1"
    forged = {"apiVersion": made["apiVersion"], "kind": "RayCluster",
              "metadata": {"name": "forged", "namespace": namespace}, "spec": spec}  # fmt: skip
    kuberay = guarded.as_user(KUBERAY, "system:masters")
    _refused(kuberay.create(forged, check=False), IMAGE_RULE)
