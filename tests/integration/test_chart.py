"""The Helm chart with real Helm: lint, template scenarios, install → test → upgrade → uninstall.

No container runs here, so the operator Deployment's pods are KWOK pods (scheduled and "Running",
nothing executes: a stand-in named as such). The operator that answers is the real process,
started locally with the chart ServiceAccount's token: the chart's RBAC is exactly what it has,
and a missing verb fails the reconcile these tests wait for. The chart's webhook configuration
points at that process (`webhook.url`, development mode) with the certificate the chart made.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

import localcluster
from fullchain import helm
from tests.kube import Kubectl, KubectlError, eventually, tenant_manifest
from tests.modeldeployments import get, sample, wait_ready
from tests.operator_process import OperatorProcess
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tramontane"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
POD_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "tramontane", str(CHART), "--namespace", "tramontane-system", *args)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


# ------------------------------------------------------------------------ lint and templates


def test_helm_lint_strict_with_every_scenario() -> None:
    helm("lint", "--strict", str(CHART))
    for values in SCENARIOS:
        helm("lint", "--strict", str(CHART), "-f", str(values))


@pytest.mark.parametrize("values", [None, *SCENARIOS], ids=lambda v: v.stem if v else "default")
def test_rendered_objects_are_restricted_and_least_privilege(values: Path | None) -> None:
    docs = render(*(["-f", str(values)] if values else []))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"] == POD_SECURITY, container["name"]
            assert container["resources"]["limits"] and container["resources"]["requests"]
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
    deployment = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert deployment["readinessProbe"] and deployment["livenessProbe"]


def test_default_install_objects() -> None:
    docs = render()
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted([
        "ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment", "Job",
        "NetworkPolicy", "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service",
        "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
        "ValidatingWebhookConfiguration",
    ])  # fmt: skip
    # The one namespaced Role: the deciding replica labels its own pod, and the webhook Service
    # routes to that label only.
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    webhook_service = next(d for name, d in services.items() if "webhook" in name)
    assert webhook_service["spec"]["selector"]["tramontane.dev/admission"] == "decides"
    # Monitoring objects are opt-in (they need the prometheus-operator CRDs).
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} & set(kinds)


def test_monitoring_scenario_renders_rules_and_dashboards() -> None:
    docs = render("-f", str(CHART / "ci" / "monitoring-values.yaml"))
    rule = by_kind(docs, "PrometheusRule")[0]
    expected = yaml.safe_load((CHART / "files" / "prometheus" / "rules.yaml").read_text())
    assert rule["spec"] == expected
    dashboards = by_kind(docs, "ConfigMap")
    assert {d["metadata"]["labels"]["grafana_dashboard"] for d in dashboards} == {"1"}
    files = {p.name for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert {name for d in dashboards for name in d["data"]} == files
    for dashboard in dashboards:
        for text in dashboard["data"].values():
            assert json.loads(text)["title"]
    assert by_kind(docs, "ServiceMonitor") and by_kind(docs, "PodMonitor")


def test_webhook_configuration_matches_what_kopf_serves() -> None:
    """The chart writes the webhook configuration kopf would register for our handlers: the
    same names, paths (kopf routes by handler id) and rules."""
    import tramontane.controller.handlers  # noqa: F401, PLC0415 (registers the handlers)

    handlers = kopf.get_default_registry()._webhooks.get_all_handlers()
    expected = {
        f"{h.id}.tramontane.dev": (
            f"/{h.id}", h.selector.group, h.selector.version, h.selector.any_name,
            sorted(h.operations or []),
        )
        for h in handlers
        if h.selector is not None
    }  # fmt: skip
    webhooks = by_kind(render(), "ValidatingWebhookConfiguration")[0]["webhooks"]
    actual = {
        w["name"]: (
            w["clientConfig"]["service"]["path"], w["rules"][0]["apiGroups"][0],
            w["rules"][0]["apiVersions"][0], w["rules"][0]["resources"][0],
            sorted(w["rules"][0]["operations"]),
        )
        for w in webhooks
    }  # fmt: skip
    assert actual == expected


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
        ("webhook.failurePolicy=Sometimes", "at '/webhook/failurePolicy': value must be one of"),
        ("webhook.timeoutSeconds=60", "at '/webhook/timeoutSeconds': maximum: got 60, want 30"),
        ("operator.logLevel=CHATTY", "at '/operator/logLevel': value must be one of"),
        ("tracing.otlpEndpoint=collector:4318", "at '/tracing/otlpEndpoint': 'collector:4318'"),
        ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
    ],
)
def test_wrong_values_fail_with_the_field_named(setting: str, message: str) -> None:
    result = helm("template", "t", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------ install on the local cluster


@dataclass
class Release:
    name: str
    namespace: str
    cluster: Kubectl
    webhook_port: int
    workdir: Path

    @property
    def fullname(self) -> str:
        return f"{self.name}-tramontane"

    def token_kubeconfig(self) -> Path:
        """A kubeconfig with the chart ServiceAccount's token: the operator's real identity."""
        token = self.cluster.run(
            "create", "token", self.fullname, "-n", self.namespace, "--duration=2h"
        ).strip()
        admin = yaml.safe_load(self.cluster.kubeconfig.read_text())
        admin["users"] = [{"name": "operator", "user": {"token": token}}]
        admin["contexts"][0]["context"]["user"] = "operator"
        path = self.workdir / "operator.kubeconfig"
        path.write_text(yaml.safe_dump(admin))
        return path

    def webhook_files(self) -> dict[str, str]:
        secret = self.cluster.json(
            "get", "secret", f"{self.fullname}-webhook-tls", "-n", self.namespace
        )
        files = {}
        for key, env in (("tls.crt", "CERT"), ("tls.key", "KEY"), ("ca.crt", "CA")):
            path = self.workdir / key
            path.write_bytes(base64.b64decode(secret["data"][key]))
            files[f"TRAMONTANE_WEBHOOK_{env}"] = str(path)
        return files


class ChartOperator(OperatorProcess):
    """The operator process as the chart configures it (peering, unmanaged webhook
    configuration, the chart's certificate), with the chart ServiceAccount's token."""

    def __init__(self, release: Release, pod_id: str) -> None:
        log_path = release.workdir / f"{pod_id}.log"
        super().__init__(release.token_kubeconfig(), log_path, otlp_endpoint="")
        self.release = release
        self.pod_id = pod_id
        self.webhook_port = release.webhook_port  # the port the chart's webhook.url names

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "POD_ID": self.pod_id,
            "TRAMONTANE_PEERING": self.release.fullname,
            "TRAMONTANE_WEBHOOK_CONFIG": "",
            "TRAMONTANE_WEBHOOK_HOST": "127.0.0.1",
            **self.release.webhook_files(),
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def release(
    crds: Kubectl, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """`helm install` into a restricted namespace. The suite's own operator steps aside and its
    webhook configuration with it: two operators would both reconcile the chart tests' Tenants
    and ModelDeployments (nothing splits the objects between them, and kopf peering ranks by
    start time, so the older suite operator would outrank the chart's), and the suite operator
    would do the work these tests require the chart's RBAC to be enough for. Whatever fails,
    from the first step on, the suite operator and the admission policies come back, so no later
    test depends on how this module ended."""
    cluster = crds
    name = f"r{uuid.uuid4().hex[:5]}"
    namespace = f"tramontane-{name}"
    rel = Release(name, namespace, cluster, free_port(), tmp_path_factory.mktemp("chart"))
    operator.stop()
    try:
        cluster.run(
            "delete", "validatingwebhookconfiguration", "tramontane.dev", "--ignore-not-found"
        )
        # The chart owns the residency admission policies; the suite applied them without Helm.
        cluster.run("delete", "-f", str(ROOT / "policies/admission"), "--ignore-not-found")
        cluster.run("create", "namespace", namespace)
        cluster.run(
            "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
        )
        install = helm(
            "install", name, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
            "--set", f"webhook.url=https://127.0.0.1:{rel.webhook_port}",
            "--set", "webhook.certIPAddresses={127.0.0.1}",
            "--set", f"kuberay.identities={{{localcluster.KUBERAY_USER}}}",
            kubeconfig=cluster.kubeconfig,
        )  # fmt: skip
        assert "STATUS: deployed" in install.stdout
        yield rel
    finally:
        helm("uninstall", name, "-n", namespace, "--wait", kubeconfig=cluster.kubeconfig,
             check=False)  # fmt: skip
        cluster.run("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.run("delete", "clusterkopfpeering", rel.fullname, "--ignore-not-found")
        cluster.run("apply", "--server-side", "--force-conflicts", "-f",
                    str(ROOT / "policies/admission"))  # fmt: skip
        operator.start()


def test_install_creates_the_operator_and_registers_the_webhook(release: Release) -> None:
    cluster = release.cluster
    for crd in ("modeldeployments.tramontane.dev", "tenants.tramontane.dev",
                "residencypolicies.tramontane.dev", "clusterkopfpeerings.kopf.dev"):  # fmt: skip
        cluster.run("wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}")
    deployment = cluster.json("get", "deployment", release.fullname, "-n", release.namespace)
    assert deployment["status"].get("readyReplicas") == 2
    # Admitted under the restricted Pod Security Standard (the namespace enforces it).
    pods = cluster.json("get", "pods", "-n", release.namespace, "-l",
                        "app.kubernetes.io/component=operator")["items"]  # fmt: skip
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)
    webhook = cluster.json("get", "validatingwebhookconfiguration", release.fullname)
    assert {w["name"] for w in webhook["webhooks"]} == {
        "modeldeployment.tramontane.dev", "tenant-delete.tramontane.dev",
        "residencypolicy-delete.tramontane.dev"}  # fmt: skip
    policies = yaml.safe_load_all(
        (CHART / "files/admission/residency-admission-policies.yaml").read_text()
    )
    for policy in filter(None, policies):
        cluster.run("get", "validatingadmissionpolicy", policy["metadata"]["name"])
    # The tenant guard, filled in with this release's operator, KubeRay and serving image.
    guard = cluster.json("get", "validatingadmissionpolicy", "tramontane-guard-raycluster")
    rules = json.dumps(guard["spec"])
    assert f"system:serviceaccount:{release.namespace}:{release.fullname}" in rules
    assert f"'{localcluster.KUBERAY_USER}'.split(',')" in rules
    assert "__TRAMONTANE_" not in rules
    cluster.run("get", "validatingadmissionpolicybinding", "tramontane-guard-namespace-labels")
    cluster.run("get", "clusterkopfpeering", release.fullname)


def test_operator_with_the_chart_rbac_serves_a_tenant_end_to_end(release: Release) -> None:
    """Tenant → namespace, quota, roles, policy bindings; ModelDeployment → webhook (through the
    chart's configuration and certificate), RayService, PodMonitor, status, events. Each needs
    its verbs in the chart's ClusterRole."""
    cluster = release.cluster
    cluster.run("apply", "-f", str(ROOT / "policies/presets/unrestricted.yaml"))
    bindings = [
        b["metadata"]["name"]
        for b in cluster.json("get", "validatingadmissionpolicybinding")["items"]
        if b["metadata"]["name"].endswith("-unrestricted")
    ]
    for binding in bindings:  # the chart's operator must be able to make them again
        cluster.run("delete", "validatingadmissionpolicybinding", binding)
    active = ChartOperator(release, "operator-a")
    active.start()
    try:
        tenant = f"tc-{uuid.uuid4().hex[:6]}"
        cluster.apply(tenant_manifest(tenant, "unrestricted", gpus=8, deployments=4))
        cluster.run("wait", f"tenant/{tenant}", "--for=condition=Ready", "--timeout=60s")
        for kind in ("resourcequota", "limitrange", "networkpolicy", "role", "rolebinding"):
            assert cluster.json("get", kind, "-n", tenant)["items"], kind
        # The webhook answers through the chart's configuration: a refusal proves it ran.
        too_big = sample(tenant, "too-big", adapters=[])
        too_big["spec"]["accelerator"] = {"type": "H100", "count": 8}
        too_big["spec"]["scaling"] = {"minReplicas": 2, "maxReplicas": 2}
        refused = cluster.create(too_big, check=False)
        assert refused.returncode != 0
        assert "GPU quota exceeded: quota.gpus is 8" in refused.stderr, refused.stderr
        cluster.apply(sample(tenant, "chat", adapters=[]))
        ready = wait_ready(cluster, tenant, "chat")
        assert ready["status"]["endpoint"]
        cluster.run("get", "rayservice", "chat", "-n", tenant)
        cluster.run("get", "podmonitor", "chat", "-n", tenant)
        for binding in bindings:
            cluster.run("get", "validatingadmissionpolicybinding", binding)
        # An API refusal, as the kubernetes client and kopf log it: not a timestamp's ",403".
        denied = re.search(r"\(403\)|\b403 Forbidden|Forbidden", active.log())
        assert denied is None, active.log()[-3000:]
        cluster.run("delete", "md", "chat", "-n", tenant, "--wait=true")
        cluster.run("delete", "tenant", tenant, "--wait=false")
    finally:
        active.stop()


def test_only_the_operator_may_label_pods_in_the_release_namespace(release: Release) -> None:
    """The webhook Service routes to the pod labelled tramontane.dev/admission=decides. Whoever
    could label a pod in the release namespace would receive the admission reviews, so the
    chart's `pods: patch` is its operator's alone, and only there."""
    cluster = release.cluster
    operator = ChartOperator(release, "operator-rbac")
    operator.start()
    tenant = f"tc-{uuid.uuid4().hex[:6]}"
    try:
        cluster.apply(tenant_manifest(tenant, "unrestricted", gpus=8, deployments=4))
        cluster.run("wait", f"tenant/{tenant}", "--for=condition=Ready", "--timeout=60s")
        admin = cluster.as_user("mallory", f"{tenant}-admins")
        admin.run("get", "md", "-n", tenant)  # the tenant's admin role is in place
        pods = cluster.json("get", "pods", "-n", release.namespace, "-l",
                            "app.kubernetes.io/component=operator")["items"]  # fmt: skip
        pod = pods[0]["metadata"]["name"]
        for args in (
            ("label", "pod", pod, "tramontane.dev/admission=decides", "--overwrite"),
            ("annotate", "pod", pod, "x=y"),
            ("delete", "pod", pod),
            ("get", "pods"),
        ):
            with pytest.raises(KubectlError) as denied:
                admin.run(*args, "-n", release.namespace)
            assert "Forbidden" in denied.value.stderr, args
        account = f"system:serviceaccount:{release.namespace}:{release.fullname}"

        def may_patch_pods(namespace: str) -> str:
            answer = cluster.run("auth", "can-i", "patch", "pods", "-n", namespace,
                                 "--as", account, check=False)  # fmt: skip
            return answer.strip()

        assert may_patch_pods(release.namespace) == "yes"
        assert may_patch_pods(tenant) == "no"
        assert may_patch_pods("kube-system") == "no"
    finally:
        cluster.run("delete", "tenant", tenant, "--wait=false", check=False)
        operator.stop()


def test_a_second_replica_waits_and_takes_over(release: Release) -> None:
    cluster = release.cluster
    first = ChartOperator(release, "operator-first")
    first.start()
    time.sleep(2)  # the first one's keep-alive is in the peering object before the second looks
    second = ChartOperator(release, "operator-second")
    second.start()
    namespace = ""
    try:
        # kopf starts paused and resumes once no live peer outranks it: the first did at once.
        assert "Resuming operations" in first.log()
        peers = eventually(
            lambda: (
                (
                    status := cluster.json("get", "clusterkopfpeering", release.fullname).get(
                        "status"
                    )
                )
                and {"operator-first", "operator-second"} <= set(status)
                and status
            ),
            30,
            "both replicas in the peering object",
        )
        assert peers["operator-first"]["priority"] > peers["operator-second"]["priority"]
        time.sleep(5)  # several keep-alive rounds: the second must still be waiting
        assert "Resuming operations" not in second.log(), second.log()
        # The first goes (a rolling update, a drained node): the second resumes and works.
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(20)
        eventually(lambda: "Resuming operations" in second.log(), 90, "the second to resume")
        namespace = f"tc-{uuid.uuid4().hex[:6]}"
        cluster.apply(tenant_manifest(namespace, "unrestricted", gpus=8, deployments=4))
        cluster.run("wait", f"tenant/{namespace}", "--for=condition=Ready", "--timeout=60s")
    finally:
        # While an operator serves the webhook: with none, the chart's failurePolicy Fail
        # refuses the delete and the tenant would outlive the test.
        if namespace:
            cluster.run("delete", "tenant", namespace, "--wait=false", check=False)
        first.stop()
        second.stop()


def test_helm_test_hook_runs(release: Release) -> None:
    """The hook Job is created and completes. (Its pod is a KWOK pod: the check inside it does
    not execute here; what runs for real is Helm's hook machinery and the Job/Pod objects.)"""
    result = helm("test", release.name, "-n", release.namespace, "--timeout", "120s",
                  kubeconfig=release.cluster.kubeconfig)  # fmt: skip
    assert f"TEST SUITE:     {release.fullname}-test" in result.stdout
    assert "Phase:          Succeeded" in result.stdout


def test_upgrade_changes_values_and_keeps_the_certificate(release: Release) -> None:
    cluster = release.cluster
    before = cluster.json("get", "secret", f"{release.fullname}-webhook-tls",
                          "-n", release.namespace)["data"]  # fmt: skip
    helm(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--wait", "--timeout",
        "120s", "--reuse-values", "-f", str(CHART / "ci" / "monitoring-values.yaml"),
        kubeconfig=cluster.kubeconfig,
    )  # fmt: skip
    after = cluster.json("get", "secret", f"{release.fullname}-webhook-tls",
                         "-n", release.namespace)["data"]  # fmt: skip
    assert after == before
    deployment = cluster.json("get", "deployment", release.fullname, "-n", release.namespace)
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["TRAMONTANE_LOG_LEVEL"] == "DEBUG"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert env["TRAMONTANE_SERVING_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    for kind in ("servicemonitor", "podmonitor", "prometheusrule"):
        cluster.run("get", kind, "-n", release.namespace, "-o", "name")
    assert cluster.json("get", "configmap", "-n", release.namespace, "-l",
                        "grafana_dashboard=1")["items"]  # fmt: skip
    history = helm("history", release.name, "-n", release.namespace,
                   kubeconfig=cluster.kubeconfig).stdout  # fmt: skip
    assert "upgrade complete" in history.lower()


def test_uninstall_keeps_crds_and_data(release: Release) -> None:
    cluster = release.cluster
    keep = f"keep-{uuid.uuid4().hex[:6]}"
    cluster.apply({
        "apiVersion": "tramontane.dev/v1alpha1", "kind": "ResidencyPolicy",
        "metadata": {"name": keep},
        "spec": {"jurisdiction": "EU", "regions": ["eu-central-1"],
                 "modelSources": ["s3://acme-eu-models/**"]},
    })  # fmt: skip
    helm("uninstall", release.name, "-n", release.namespace, "--wait",
         kubeconfig=cluster.kubeconfig)  # fmt: skip
    for crd in ("modeldeployments.tramontane.dev", "clusterkopfpeerings.kopf.dev"):
        cluster.run("get", "crd", crd)
    assert get(cluster, "residencypolicy", "", keep) is not None
    assert get(cluster, "validatingwebhookconfiguration", "", release.fullname) is None
    assert get(cluster, "clusterrole", "", release.fullname) is None
    cluster.run("delete", "residencypolicy", keep)
