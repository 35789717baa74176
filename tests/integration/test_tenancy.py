"""Tenants and residency policies on the real control plane (KWOK nodes in EU and US regions)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Kubectl, KubectlError, eventually, tenant_manifest
from tests.modeldeployments import condition, get, sample, wait_ready
from tests.operator_process import SERVING_OTLP_ENDPOINT, OperatorProcess
from tests.tenants import MODELS_CLAIM, provision_tenant, remove_tenant
from tramontane.controller import reconcile, tenants
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import MODELDEPLOYMENT, TENANT, Kube
from tramontane.controller.settings import TramontaneSettings

REPO = Path(__file__).resolve().parents[2]
EU_REGIONS = {"eu-west-1", "eu-west-3", "eu-central-1", "eu-central-2", "eu-north-1",
              "eu-south-1", "eu-south-2"}  # fmt: skip


@pytest.fixture(scope="module")
def presets(crds: Kubectl) -> Kubectl:
    crds.run("apply", "-f", str(REPO / "policies" / "presets"))
    return crds


@pytest.fixture
def make_tenant(presets: Kubectl, operator: OperatorProcess) -> Iterator[Any]:
    created: list[str] = []

    def make(policy: str, **kwargs: Any) -> str:
        name = f"tn-{uuid.uuid4().hex[:6]}"
        created.append(name)
        provision_tenant(presets, name, policy, **kwargs)
        return name

    yield make
    for name in created:
        remove_tenant(presets, name)


def _eu_sample(namespace: str, name: str) -> dict[str, Any]:
    md = sample(namespace, name, adapters=[], scaling={"minReplicas": 1, "maxReplicas": 3})
    md["spec"]["model"]["uri"] = f"pvc://{MODELS_CLAIM}/llama-3.1-8b-instruct"
    return md


def test_tenant_namespace_has_its_guard_rails(cluster: Kubectl, make_tenant: Any) -> None:
    name = make_tenant("eu", network={"ingressNamespaces": ["api-gateway"],
                                      "ingressCIDRs": ["10.10.0.0/16"]})  # fmt: skip
    labels = cluster.json("get", "namespace", name)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["tramontane.dev/tenant"] == name
    assert labels["tramontane.dev/residency-policy"] == "eu"
    quota = cluster.json("get", "resourcequota", "tramontane-tenant", "-n", name)["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == "64"
    assert "pods" in quota
    cluster.run("get", "limitrange", "tramontane-tenant", "-n", name)

    # (f) NetworkPolicies: stored with the expected rules (no CNI here enforces them).
    policies = {
        p["metadata"]["name"]: p["spec"]
        for p in cluster.json("get", "networkpolicy", "-n", name)["items"]
    }
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny
    assert policies["allow-same-namespace"]["ingress"] == [{"from": [{"podSelector": {}}]}]
    dns = policies["allow-dns"]["egress"][0]
    assert {"protocol": "UDP", "port": 53} in dns["ports"]
    scrape = policies["allow-prometheus-scrape"]["ingress"][0]
    assert scrape["ports"] == [{"protocol": "TCP", "port": 8080}]
    sources = policies["allow-ingress-sources"]["ingress"][0]
    assert {"ipBlock": {"cidr": "10.10.0.0/16"}} in sources["from"]
    selector = sources["from"][0]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == ["api-gateway"]
    # The eu preset allows no egress CIDR: the policy exists and allows nothing.
    assert not policies["allow-egress-residency-policy"].get("egress")


def test_emptied_network_lists_withdraw_what_they_allowed(
    cluster: Kubectl, make_tenant: Any
) -> None:
    """A careless platform admin empties a tenant's ingress list: the flows it allowed go too."""
    name = make_tenant("eu", network={"ingressNamespaces": ["api-gateway"],
                                      "ingressCIDRs": ["10.10.0.0/16"]})  # fmt: skip
    patch = json.dumps({"spec": {"network": {"ingressNamespaces": [], "ingressCIDRs": []}}})
    cluster.run("patch", "tenant", name, "--type=merge", "-p", patch)

    def withdrawn() -> bool:
        policy = cluster.json("get", "networkpolicy", "allow-ingress-sources", "-n", name)
        return not policy["spec"].get("ingress")

    eventually(withdrawn, 30, "the ingress allow-policy to allow nothing")


def test_rbac_isolates_tenants(cluster: Kubectl, make_tenant: Any) -> None:
    tenant_a, tenant_b = make_tenant("eu"), make_tenant("unrestricted")
    admin_a = cluster.as_user("alice", f"{tenant_a}-admins")
    # Manage their own deployments, read their pods, manage their own Secrets.
    admin_a.apply(_eu_sample(tenant_a, "own"))
    assert admin_a.json("get", "md", "-n", tenant_a)["items"]
    admin_a.run("get", "pods", "-n", tenant_a)
    admin_a.run("create", "secret", "generic", "api-keys", "-n", tenant_a, "--from-literal=k=v")
    admin_a.run("delete", "md", "own", "-n", tenant_a)
    # Nothing of tenant B's.
    cluster.apply(_eu_sample(tenant_b, "theirs"))
    # get one, list (get without a name) deployments; list pods and Secrets.
    for args in (("get", "md", "theirs"), ("get", "md"), ("get", "pods"), ("get", "secrets")):
        with pytest.raises(KubectlError) as denied:
            admin_a.run(*args, "-n", tenant_b)
        assert "Forbidden" in denied.value.stderr
    with pytest.raises(KubectlError):
        admin_a.run("delete", "md", "theirs", "-n", tenant_b)
    with pytest.raises(KubectlError):
        admin_a.run("scale", "md/theirs", "-n", tenant_b, "--replicas=2")
    # Cannot loosen their own namespace (labels carry the residency policy).
    with pytest.raises(KubectlError):
        admin_a.run("label", "namespace", tenant_a, "tramontane.dev/residency-policy=unrestricted",
                    "--overwrite")  # fmt: skip
    # Members read, and only read.
    member = cluster.as_user(f"reader@{tenant_b}.example")
    assert member.json("get", "md", "-n", tenant_b)["items"]
    with pytest.raises(KubectlError):
        member.run("delete", "md", "theirs", "-n", tenant_b)
    with pytest.raises(KubectlError):
        member.run("get", "secrets", "-n", tenant_b)


def _placements(cluster: Kubectl, namespace: str) -> dict[str, str]:
    nodes = {
        n["metadata"]["name"]: n["metadata"]["labels"]["topology.kubernetes.io/region"]
        for n in cluster.json("get", "nodes")["items"]
    }
    pods = cluster.json("get", "pods", "-n", namespace)["items"]
    return {
        p["metadata"]["name"]: nodes[p["spec"]["nodeName"]]
        for p in pods
        if p["spec"].get("nodeName")
    }


def test_eu_tenant_pods_never_leave_the_eu(cluster: Kubectl, make_tenant: Any) -> None:
    eu, anywhere = make_tenant("eu", gpus=64), make_tenant("unrestricted", gpus=64)
    names = [f"eu-{i:02d}" for i in range(20)]
    cluster.apply(*(_eu_sample(eu, n) for n in names))
    cluster.apply(*(_eu_sample(anywhere, f"any-{i}") for i in range(4)))
    for name in names:
        md = wait_ready(cluster, eu, name, timeout=180)
        compliant = condition(md, "ResidencyCompliant")
        assert compliant["status"] == "True", compliant
        assert "eu-west-3" in compliant["message"]
    # Scale-up as the Ray autoscaler does it (it cannot run here: no container runs in the
    # pods): raise the worker replicas of the RayClusters; KubeRay adds pods from the template.
    for name in names[:5]:
        (raycluster,) = cluster.json(
            "get", "raycluster", "-n", eu, "-l", f"tramontane.dev/model-deployment={name}"
        )["items"]
        cluster.run("patch", "raycluster", raycluster["metadata"]["name"], "-n", eu,
                    "--type=json", "-p",
                    json.dumps([{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas",
                                 "value": 3}]))  # fmt: skip

    def workers() -> int:
        return len(cluster.json("get", "pods", "-n", eu, "-l", "ray.io/node-type=worker")["items"])

    eventually(lambda: workers() >= 30, 120, "scaled-up EU workers")
    placements = _placements(cluster, eu)
    assert len(placements) >= 40
    outside = {pod: region for pod, region in placements.items() if region not in EU_REGIONS}
    assert not outside, f"EU pods scheduled outside the EU: {outside}"
    rayservice = cluster.json("get", "rayservice", names[0], "-n", eu)
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    term = head["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expression,) = term["nodeSelectorTerms"][0]["matchExpressions"]
    assert set(expression["values"]) == EU_REGIONS


def test_model_source_outside_the_policy_is_rejected_at_admission(
    cluster: Kubectl, make_tenant: Any
) -> None:
    eu = make_tenant("eu")
    md = _eu_sample(eu, "us-bucket")
    md["spec"]["model"]["uri"] = "s3://acme-us-models/llama"
    result = cluster.create(md, check=False)
    assert result.returncode != 0
    assert "s3://acme-us-models/llama not allowed by ResidencyPolicy eu" in result.stderr
    assert "modelSources: pvc://**" in result.stderr
    # A refusal, not a broken webhook: 403 Forbidden (kopf's default was 500).
    assert cluster.create_status(md) == 403
    assert get(cluster, "md", eu, "us-bucket") is None


def test_deployment_made_non_compliant_by_a_policy_change_is_withdrawn(
    cluster: Kubectl, make_tenant: Any
) -> None:
    tenant = make_tenant("unrestricted")
    md = _eu_sample(tenant, "from-s3")
    md["spec"]["model"]["uri"] = "s3://acme-us-models/llama"
    cluster.apply(md)
    wait_ready(cluster, tenant, "from-s3")
    cluster.run("patch", "tenant", tenant, "--type=merge", "-p",
                json.dumps({"spec": {"residencyPolicy": "eu"}}))  # fmt: skip

    def withdrawn() -> dict[str, Any] | None:
        obj = get(cluster, "md", tenant, "from-s3")
        ok = obj and condition(obj, "ResidencyCompliant").get("status") == "False"
        return obj if ok and get(cluster, "rayservice", tenant, "from-s3") is None else None

    obj = eventually(withdrawn, 30, "ResidencyCompliant=False and the RayService removed")
    cond = condition(obj, "ResidencyCompliant")
    assert cond["reason"] == "ModelSourceNotAllowed"
    assert "s3://acme-us-models/llama" in cond["message"]
    assert condition(obj, "Ready")["status"] == "False"
    # Nothing is applied, and status says so (not "Applied").
    reconciled = condition(obj, "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "Withdrawn")


def test_indexes_that_miss_the_policy_neither_withdraw_nor_report_a_compliant_deployment(
    cluster: Kubectl, make_tenant: Any, operator: OperatorProcess
) -> None:
    """A replica resumed after a peering pause reconciles while kopf lists every kind again: its
    indexes may hold the namespace and the Tenant but not yet their ResidencyPolicy (seen in CI:
    the standby taking over withdrew the full chain's deployment, and its endpoint went away for
    minutes). The reconciles of the deployment and of its Tenant, given that view, confirm from
    the API: the RayService stays (same uid), neither status says the policy is missing, and the
    namespace quota keeps its room for the deployment's upgrade. The suite's operator is stopped
    meanwhile: the replica with the lagging view is the only one acting, as after a take-over."""
    tenant = make_tenant("eu")
    cluster.apply(_eu_sample(tenant, "kept"))
    wait_ready(cluster, tenant, "kept")

    def rayservice_uid() -> str | None:
        rayservice = get(cluster, "rayservice", tenant, "kept")
        return str(rayservice["metadata"]["uid"]) if rayservice else None

    def reconcile_tenant(facts: Facts) -> tuple[dict[str, Any], dict[str, Any]]:
        """Its Tenant reconciled with `facts`: the Tenant's status and the namespace's quota."""
        body = kube.get(TENANT, None, tenant)
        assert body is not None
        tenants.reconcile_tenant(kube, body, settings.tenant_options(), facts)
        quota = cluster.json("get", "resourcequota", "tramontane-tenant", "-n", tenant)
        return cluster.json("get", "tenant", tenant)["status"], quota["spec"]["hard"]

    before = rayservice_uid()
    assert before
    settings = TramontaneSettings.from_env(operator.environment())
    kube = Kube.from_environment(str(cluster.kubeconfig))
    current = Facts.from_api(kube, tenant, with_regions=False)
    assert current.policy_of(current.owner()) is not None and current.deployments
    # The view that withdrew before: no policy yet, and none of the namespace's deployments.
    lagging = replace(current, policies={}, deployments=())
    operator.stop()
    try:
        # The truth: the quota a reconcile with the whole view makes (room for one upgrade).
        # The Tenant is Ready once the quota controller has computed a changed quota: its
        # status event would reconcile again, done here by hand.
        def counted() -> dict[str, Any] | None:
            status, hard = reconcile_tenant(current)
            return hard if status["modelDeployments"] == 1 else None

        hard = eventually(counted, 30, "the Tenant Ready with its deployment counted")

        body = kube.get(MODELDEPLOYMENT, tenant, "kept")
        assert body is not None
        reconcile.reconcile_modeldeployment(kube, body, settings.render_options(), lagging)
        assert rayservice_uid() == before, "the RayService was withdrawn on the indexes' word"
        md = cluster.json("get", "md", "kept", "-n", tenant)
        assert condition(md, "ResidencyCompliant")["status"] == "True", md["status"]
        assert condition(md, "Ready")["status"] == "True", md["status"]
        events = cluster.json("get", "events.events.k8s.io", "-n", tenant)["items"]
        assert not [e for e in events if e["reason"] == "ResidencyViolation"], events

        for view in (lagging, replace(current, deployments=())):  # policies listed, not MDs
            status_seen, hard_seen = reconcile_tenant(view)
            ready = condition({"status": status_seen}, "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "Provisioned"), ready
            assert status_seen["modelDeployments"] == 1
            assert hard_seen == hard  # the room for an upgrade counts the deployment it missed
    finally:
        operator.start()


def test_over_quota_deployment_is_rejected_naming_quota_and_use(
    cluster: Kubectl, make_tenant: Any
) -> None:
    tenant = make_tenant("eu", gpus=8)
    first = _eu_sample(tenant, "first")
    first["spec"]["accelerator"] = {"type": "H100", "count": 2}
    first["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 3}
    cluster.apply(first)  # 6 GPUs at its maximum
    second = _eu_sample(tenant, "second")  # 1 GPU x maxReplicas 3
    result = cluster.create(second, check=False)
    assert result.returncode != 0
    assert "quota.gpus is 8" in result.stderr
    assert "6 in use by 1 other deployment(s)" in result.stderr
    assert "this one needs 3" in result.stderr
    assert cluster.create_status(second) == 403
    assert get(cluster, "md", tenant, "second") is None
    second["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 2}
    cluster.create(second)  # exactly at quota
    # Raising the maximum of an existing deployment is checked too.
    with pytest.raises(KubectlError) as rejected:
        cluster.run("patch", "md", "first", "-n", tenant, "--type=merge", "-p",
                    json.dumps({"spec": {"scaling": {"maxReplicas": 4}}}))  # fmt: skip
    assert "quota.gpus is 8" in rejected.value.stderr


def test_the_namespace_quota_leaves_room_for_one_upgrade_at_the_quota_edge(
    cluster: Kubectl, make_tenant: Any
) -> None:
    """KubeRay builds the upgraded cluster beside the serving one (zero downtime). At the quota
    edge, the namespace's ResourceQuota must leave room for it, or its GPU workers are refused
    and the upgrade never finishes; the webhook still caps deployments at quota.gpus."""
    tenant = make_tenant("eu", gpus=2)
    md = _eu_sample(tenant, "edge")
    md["spec"]["accelerator"] = {"type": "H100", "count": 2}
    md["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 1}
    cluster.apply(md)
    wait_ready(cluster, tenant, "edge", timeout=120)

    def hard_gpus() -> str:
        quota = cluster.json("get", "resourcequota", "tramontane-tenant", "-n", tenant)
        return str(quota["spec"]["hard"]["requests.nvidia.com/gpu"])

    eventually(lambda: hard_gpus() == "4", 60, "room for one upgrade of the 2-GPU deployment")
    # Room for exactly one more 2-GPU worker: the upgraded cluster's (no GPU exists here, so
    # the quota's arithmetic is what is checked; KubeRay makes that pod during an upgrade).
    used = cluster.json("get", "resourcequota", "tramontane-tenant", "-n", tenant)["status"]
    assert used["used"]["requests.nvidia.com/gpu"] == "2"
    # The steady state is still capped at quota.gpus by the webhook.
    over = _eu_sample(tenant, "over")
    result = cluster.create(over, check=False)
    assert result.returncode != 0 and "quota.gpus is 2" in result.stderr


def test_modeldeployment_outside_a_tenant_namespace_is_rejected(
    cluster: Kubectl, presets: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    result = cluster.create(_eu_sample(namespace, "orphan"), check=False)
    assert result.returncode != 0
    assert f"namespace {namespace} belongs to no Tenant" in result.stderr


def test_accelerator_must_exist_in_an_allowed_region(cluster: Kubectl, make_tenant: Any) -> None:
    tenant = make_tenant("germany")
    md = _eu_sample(tenant, "l40s")
    md["spec"]["accelerator"] = {"type": "L40S", "count": 1}
    result = cluster.create(md, check=False)
    assert result.returncode != 0
    assert "no L40S nodes in the regions ResidencyPolicy germany allows (eu-central-1)" in (
        result.stderr
    )


def test_tenant_with_deployments_cannot_be_deleted(cluster: Kubectl, make_tenant: Any) -> None:
    tenant = make_tenant("eu")
    cluster.apply(_eu_sample(tenant, "keeps-it"))
    with pytest.raises(KubectlError) as refused:
        cluster.run("delete", "tenant", tenant, "--wait=false")
    assert "still has 1 ModelDeployment(s)" in refused.value.stderr
    assert "keeps-it" in refused.value.stderr
    assert get(cluster, "tenant", "", tenant) is not None


def test_webhook_down_refuses_our_kinds_only(
    cluster: Kubectl, make_tenant: Any, operator: OperatorProcess
) -> None:
    tenant = make_tenant("eu")
    operator.kill()
    try:
        result = cluster.create(_eu_sample(tenant, "while-down"), check=False)
        assert result.returncode != 0
        assert "failed calling webhook" in result.stderr
        # Everything else is untouched by our webhook.
        cluster.run("create", "configmap", "unaffected", "-n", tenant, "--from-literal=a=b")
    finally:
        operator.start()
    cluster.apply(_eu_sample(tenant, "after-restart"))


def test_changing_the_policy_moves_deployments(cluster: Kubectl, make_tenant: Any) -> None:
    tenant = make_tenant("eu")
    cluster.apply(_eu_sample(tenant, "moves"))
    wait_ready(cluster, tenant, "moves")
    cluster.run("patch", "tenant", tenant, "--type=merge", "-p",
                json.dumps({"spec": {"residencyPolicy": "france"}}))  # fmt: skip

    def in_france() -> bool:
        rs = get(cluster, "rayservice", tenant, "moves") or {}
        groups = rs.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs", [{}])
        term = groups[0]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0]
        regions = [
            e for e in term["matchExpressions"] if e["key"] == "topology.kubernetes.io/region"
        ]
        return regions == [
            {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["eu-west-3"]}
        ]

    eventually(in_france, 30, "the RayService to be pinned to eu-west-3")
    labels = cluster.json("get", "namespace", tenant)["metadata"]["labels"]
    assert labels["tramontane.dev/jurisdiction"] == "FR"


@pytest.mark.usefixtures("presets", "operator")
def test_tenant_cannot_take_over_an_existing_namespace(cluster: Kubectl) -> None:
    name = f"tn-{uuid.uuid4().hex[:6]}"
    manifest = tenant_manifest(name, "eu")
    manifest["spec"]["namespace"] = "default"
    cluster.apply(manifest)
    try:
        obj = eventually(
            lambda: (t := get(cluster, "tenant", "", name)) and condition(t, "Ready") and t,
            30,
            "Tenant status",
        )
        assert condition(obj, "Ready")["reason"] == "NamespaceTaken"
        labels = cluster.json("get", "namespace", "default")["metadata"].get("labels", {})
        assert "tramontane.dev/tenant" not in labels
        assert not cluster.json("get", "networkpolicy", "-n", "default")["items"]
    finally:
        cluster.run("delete", "tenant", name)


BAD_TENANCY = [
    ("rp: * with other regions", "ResidencyPolicy", {"regions": ["*", "eu-west-3"]}, "regions"),
    ("rp: bad region", "ResidencyPolicy", {"regions": ["EU West"]}, "spec.regions[0]"),
    ("rp: no regions", "ResidencyPolicy", {"regions": []}, "spec.regions"),
    ("rp: bad cidr", "ResidencyPolicy", {"egressCIDRs": ["10.0.0.0/33"]}, "spec.egressCIDRs[0]"),
    ("rp: bad source", "ResidencyPolicy", {"modelSources": ["ftp://x/**"]}, "spec.modelSources[0]"),
    ("rp: no sources", "ResidencyPolicy", {"modelSources": []}, "spec.modelSources"),
    ("rp: bad jurisdiction", "ResidencyPolicy", {"jurisdiction": "E U"}, "spec.jurisdiction"),
    ("rp: http telemetry", "ResidencyPolicy", {"telemetryEndpoints": ["http://otel:4318"]},
     "spec.telemetryEndpoints[0]"),
    # Plain http only to a cluster Service: a public name is refused even if it ends in svc.
    ("rp: http telemetry outside", "ResidencyPolicy",
     {"telemetryEndpoints": ["http://otel.evil.com:4318"]}, "spec.telemetryEndpoints[0]"),
    ("rp: http telemetry svc lookalike", "ResidencyPolicy",
     {"telemetryEndpoints": ["http://otel.evilsvc:4318"]}, "spec.telemetryEndpoints[0]"),
    ("rp: http telemetry svc subdomain", "ResidencyPolicy",
     {"telemetryEndpoints": ["http://otel.x.svc.evil.com/v1"]}, "spec.telemetryEndpoints[0]"),
    ("tenant: no admins", "Tenant", {"admins": {}}, "spec.admins"),
    ("tenant: negative gpus", "Tenant", {"quota": {"gpus": -1}}, "spec.quota.gpus"),
    ("tenant: bad namespace", "Tenant", {"namespace": "Team_A"}, "spec.namespace"),
    ("tenant: no policy", "Tenant", {"residencyPolicy": None}, "spec.residencyPolicy"),
    ("tenant: bad ingress cidr", "Tenant", {"network": {"ingressCIDRs": ["nope"]}},
     "spec.network.ingressCIDRs[0]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "kind", "change", "field"), BAD_TENANCY, ids=[c[0] for c in BAD_TENANCY]
)
def test_bad_tenancy_objects_are_rejected(
    presets: Kubectl, case: str, kind: str, change: dict[str, Any], field: str
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    if kind == "Tenant":
        manifest = tenant_manifest(name, "eu")
    else:
        manifest = yaml.safe_load((REPO / "policies/presets/eu.yaml").read_text())
        manifest["metadata"]["name"] = name
    for key, value in change.items():
        if value is None:
            manifest["spec"].pop(key)
        else:
            manifest["spec"][key] = value
    result = presets.create(manifest, check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, result.stderr
    plural = "tenant" if kind == "Tenant" else "residencypolicy"
    assert get(presets, plural, "", name) is None


def test_tenant_namespace_is_immutable(cluster: Kubectl, make_tenant: Any) -> None:
    name = make_tenant("eu")
    with pytest.raises(KubectlError) as rejected:
        cluster.run("patch", "tenant", name, "--type=merge", "-p",
                    json.dumps({"spec": {"namespace": "elsewhere"}}))  # fmt: skip
    assert "namespace is immutable: create a new Tenant" in rejected.value.stderr


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "rayproject/ray:2.60.0", "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
            **spec,
        },
    }  # fmt: skip


def _region_affinity(*regions: str) -> dict[str, Any]:
    expression = {"key": "topology.kubernetes.io/region", "operator": "In", "values": list(regions)}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [expression]}]}}}  # fmt: skip


def test_admission_policy_rejects_workloads_that_could_leave_the_regions(
    cluster: Kubectl, make_tenant: Any
) -> None:
    eu, anywhere = make_tenant("eu"), make_tenant("unrestricted")
    # Tenant admins cannot create pods at all (RBAC) ...
    with pytest.raises(KubectlError) as denied:
        cluster.as_user("alice", f"{eu}-admins").run(
            "create", "-n", eu, "-f", "-", stdin=json.dumps(_pod("by-admin"))
        )
    assert "cannot create resource" in denied.value.stderr
    # ... and the admission policy holds for everyone, cluster admins included.
    rejected = {
        "no-affinity": _pod("no-affinity"),
        "us-region": _pod("us-region", affinity=_region_affinity("us-east-1")),
        "mixed": _pod("mixed", affinity=_region_affinity("eu-west-3", "us-east-1")),
        "node-name": _pod("node-name", nodeName="h100-us-east-1a-1",
                          affinity=_region_affinity("eu-west-3")),
        "us-selector": _pod("us-selector",
                            nodeSelector={"topology.kubernetes.io/region": "us-east-1"}),
    }  # fmt: skip
    for name, pod in rejected.items():
        result = cluster.create({**pod, "metadata": {"name": name, "namespace": eu}}, check=False)
        assert result.returncode != 0, f"{name} was admitted"
        assert "ValidatingAdmissionPolicy 'tramontane-residency-pod'" in result.stderr
        assert "ResidencyPolicy eu" in result.stderr or "nodeName" in result.stderr
    allowed = _pod("pinned", affinity=_region_affinity("eu-west-3", "eu-central-1"))
    cluster.create({**allowed, "metadata": {"name": "pinned", "namespace": eu}})
    selector = _pod("selector", nodeSelector={"topology.kubernetes.io/region": "eu-west-3"})
    cluster.create({**selector, "metadata": {"name": "selector", "namespace": eu}})
    cluster.create({**_pod("free"), "metadata": {"name": "free", "namespace": anywhere}})
    # A scheduled pod (spec.nodeName set by then) can still be labelled, as controllers do:
    # KubeRay labels the Ray head that serves, and its Service selects on that label.
    eventually(
        lambda: cluster.json("get", "pod", "pinned", "-n", eu)["spec"].get("nodeName"),
        30,
        "the pod to be scheduled",
    )
    cluster.run("label", "pod", "pinned", "-n", eu, "ray.io/serve=true")
    cluster.run("annotate", "pod", "pinned", "-n", eu, "example.com/note=kept")

    # RayClusters and RayServices: a worker group without the affinity is enough to refuse.
    pinned = _region_affinity("eu-west-3")
    raycluster: dict[str, Any] = {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "direct", "namespace": eu},
        "spec": {
            "headGroupSpec": {"rayStartParams": {},
                              "template": {"spec": {**_pod("h")["spec"], "affinity": pinned}}},
            "workerGroupSpecs": [{"groupName": "w", "replicas": 1, "minReplicas": 0,
                                  "maxReplicas": 2, "rayStartParams": {},
                                  "template": {"spec": _pod("w")["spec"]}}],
        },
    }  # fmt: skip
    result = cluster.create(raycluster, check=False)
    assert result.returncode != 0
    assert "tramontane-residency-raycluster" in result.stderr
    rayservice = {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "direct", "namespace": eu},
        "spec": {"rayClusterConfig": raycluster["spec"]},
    }  # fmt: skip
    result = cluster.create(rayservice, check=False)
    assert result.returncode != 0
    assert "tramontane-residency-rayservice" in result.stderr
    raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["affinity"] = pinned
    cluster.create(raycluster)
    assert not cluster.json("get", "rayservice", "-n", eu)["items"]


# ------------------------------------------------------------ hostile tenancy (issue 14)


def _racing_creates(cluster: Kubectl, manifests: list[dict[str, Any]]) -> list[bool]:
    """Create all at once, as a script or a GitOps sync would: which ones were admitted."""
    with ThreadPoolExecutor(max_workers=len(manifests)) as pool:
        results = list(pool.map(lambda m: cluster.create(m, check=False), manifests))
    refusals = [r.stderr for r in results if r.returncode != 0]
    assert all("quota" in why for why in refusals), refusals[:3]
    return [r.returncode == 0 for r in results]


def _single_replica_samples(tenant: str, count: int) -> list[dict[str, Any]]:
    manifests = []
    for i in range(count):
        md = _eu_sample(tenant, f"race-{i}")
        md["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 1}  # 1 H100 each
        manifests.append(md)
    return manifests


@pytest.mark.parametrize(
    ("quota", "racing", "fits"),
    [({"gpus": 4, "deployments": 30}, 20, 4), ({"gpus": 64, "deployments": 2}, 10, 2)],
    ids=["gpu-quota-edge", "deployment-count-edge"],
)
def test_racing_creates_at_the_quota_edge_admit_exactly_what_fits(
    cluster: Kubectl, make_tenant: Any, quota: dict[str, int], racing: int, fits: int
) -> None:
    tenant = make_tenant("eu", **quota)
    admitted = _racing_creates(cluster, _single_replica_samples(tenant, racing))
    assert sum(admitted) == fits
    assert len(cluster.json("get", "md", "-n", tenant)["items"]) == fits


def _policy_copy(name: str) -> dict[str, Any]:
    policy: dict[str, Any] = yaml.safe_load((REPO / "policies/presets/eu.yaml").read_text())
    policy["metadata"] = {"name": name}
    return policy


def test_a_residency_policy_in_use_cannot_be_deleted_and_its_bindings_outlive_it(
    cluster: Kubectl, make_tenant: Any
) -> None:
    policy = f"eu-copy-{uuid.uuid4().hex[:6]}"
    cluster.apply(_policy_copy(policy))
    tenant = make_tenant(policy)
    bindings_of = ("validatingadmissionpolicybindings", "-l",
                   f"tramontane.dev/residency-policy={policy}")  # fmt: skip
    bindings = eventually(
        lambda: cluster.json("get", *bindings_of)["items"], 30, "the policy's bindings"
    )
    # A platform admin's mistake: deleting the policy a tenant lives under.
    result = cluster.attempt("delete", "residencypolicy", policy, "--wait=false")
    assert result.returncode != 0
    assert f"ResidencyPolicy {policy} is the residencyPolicy of Tenant {tenant}" in result.stderr
    assert cluster.json("get", "residencypolicy", policy)["metadata"]["name"] == policy
    # Nothing for garbage collection to take with the policy: residency admission stays.
    assert all(not b["metadata"].get("ownerReferences") for b in bindings)
    assert all(b["spec"]["paramRef"]["parameterNotFoundAction"] == "Deny" for b in bindings)
    # Unused, it goes, and its bindings with it.
    cluster.run("patch", "tenant", tenant, "--type=merge", "-p",
                json.dumps({"spec": {"residencyPolicy": "eu"}}))  # fmt: skip
    cluster.run("delete", "residencypolicy", policy, "--timeout=60s")
    eventually(lambda: not cluster.json("get", *bindings_of)["items"], 30,
               "the unused policy's bindings removed")  # fmt: skip


def test_tenant_labels_changed_by_a_platform_admin_are_restored_and_nothing_runs_unpinned(
    cluster: Kubectl, make_tenant: Any
) -> None:
    # Without the tenant guard policies (test_tenant_guard refuses these changes outright):
    # a cluster admin's mistake, or a guard switched off.
    tenant = make_tenant("eu")
    cluster.apply(_eu_sample(tenant, "pinned"))
    wait_ready(cluster, tenant, "pinned")

    def labels() -> dict[str, str]:
        return dict(cluster.json("get", "namespace", tenant)["metadata"].get("labels") or {})

    for change in (["tramontane.dev/tenant-"], ["tramontane.dev/residency-policy-"],
                   ["--overwrite", "tramontane.dev/residency-policy=unrestricted"],
                   ["--overwrite", "tramontane.dev/tenant=someone-else"]):  # fmt: skip
        cluster.run("label", "namespace", tenant, *change)
        eventually(lambda: labels().get("tramontane.dev/tenant") == tenant
                   and labels().get("tramontane.dev/residency-policy") == "eu", 20,
                   f"the operator to restore the labels after {change}")  # fmt: skip
        # The deployment is still pinned to the policy's regions, never rendered without them.
        rayservice = get(cluster, "rayservice", tenant, "pinned")
        if rayservice is not None:
            placements = json.dumps(rayservice["spec"]["rayClusterConfig"])
            assert "eu-west-1" in placements and "us-east-1" not in placements
        md = wait_ready(cluster, tenant, "pinned", timeout=30)
        assert condition(md, "ResidencyCompliant")["reason"] == "WithinPolicy"
    owner = get(cluster, "tenant", "", tenant) or {}
    assert condition(owner, "Ready")["reason"] == "Provisioned"


def test_a_namespace_labelled_as_another_tenants_is_not_theirs(
    cluster: Kubectl, make_tenant: Any, namespace: str
) -> None:
    victim = make_tenant("eu")
    cluster.run("label", "namespace", namespace, f"tramontane.dev/tenant={victim}",
                "tramontane.dev/residency-policy=eu")  # fmt: skip
    result = cluster.create(_eu_sample(namespace, "squatter"), check=False)
    assert result.returncode != 0
    assert f"namespace {namespace} belongs to no Tenant" in result.stderr
    assert cluster.create_status(_eu_sample(namespace, "squatter")) == 403
    assert (get(cluster, "tenant", "", victim) or {})["status"].get("modelDeployments", 0) == 0


def _serving_env(cluster: Kubectl, namespace: str, name: str) -> dict[str, str]:
    rayservice = get(cluster, "rayservice", namespace, name) or {}
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    return {e["name"]: e.get("value", "") for e in head["containers"][0].get("env", [])}


def test_request_spans_go_only_where_the_policy_lists(cluster: Kubectl, make_tenant: Any) -> None:
    listed = f"eu-traced-{uuid.uuid4().hex[:6]}"
    policy = _policy_copy(listed)
    policy["spec"]["telemetryEndpoints"] = [SERVING_OTLP_ENDPOINT]
    cluster.apply(policy)
    traced, silent = make_tenant(listed), make_tenant("eu")
    try:
        for tenant in (traced, silent):
            cluster.apply(_eu_sample(tenant, "spans"))
        wait_ready(cluster, traced, "spans")
        assert _serving_env(cluster, traced, "spans")["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            SERVING_OTLP_ENDPOINT
        )
        md = wait_ready(cluster, silent, "spans")
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in _serving_env(cluster, silent, "spans")
        assert "request spans not exported" in condition(md, "ResidencyCompliant")["message"]
    finally:
        remove_tenant(cluster, traced)  # a Tenant being deleted no longer holds its policy
        cluster.run("delete", "residencypolicy", listed, "--ignore-not-found")
