"""Faults on the real control plane: what fails is retried, nothing is lost, nothing duplicated.

Each test breaks something the operator depends on, mends it, and checks that everything
converges on its own, with no help from a new watch event.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

import localcluster
from kubernetes import client, config
from tests.kube import Kubectl, eventually, tenant_manifest
from tests.modeldeployments import condition, get, sample, wait_ready
from tests.operator_process import OperatorProcess
from tests.otelcol import Collector
from tramontane.controller.admission import self_signed

REPO = Path(__file__).resolve().parents[2]
PEERING_CRD = REPO / "charts/tramontane/crds/kopf.dev_clusterkopfpeerings.yaml"

REFUSE_RAYSERVICES = "tramontane-test-refuse-rayservices"
REFUSE_TENANT_STATUS = "tramontane-test-refuse-tenant-status"


def _refusal(
    name: str, rule: dict[str, Any], expression: str, message: str
) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy and its binding that refuse what `expression` rejects."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [rule]},
                "validations": [{"expression": expression, "message": message}],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]


@pytest.fixture
def refusals(cluster: Kubectl, tenant_namespace: str, tmp_path: Path) -> Iterator[str]:
    """The namespace's RayServices and its Tenant's status updates refused by the API server."""
    namespace = tenant_namespace
    cluster.apply(
        *_refusal(
            REFUSE_RAYSERVICES,
            {
                "apiGroups": ["ray.io"],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["rayservices"],
            },
            f"object.metadata.namespace != '{namespace}'",
            "refused by a test policy",
        ),
        *_refusal(
            REFUSE_TENANT_STATUS,
            {
                "apiGroups": ["tramontane.dev"],
                "apiVersions": ["v1alpha1"],
                "operations": ["UPDATE"],
                "resources": ["tenants/status"],
            },
            f"object.metadata.name != '{namespace}'",
            "refused by a test policy",
        ),
    )
    # A new admission policy takes effect once the API server has loaded it (about a second):
    # probe both refusals with server-side dry runs.
    probe = tmp_path / "probe.json"
    head = {"containers": [{"name": "ray-head", "image": "probe"}]}
    probe.write_text(json.dumps({
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {"rayClusterConfig": {"headGroupSpec": {"rayStartParams": {},
                                                        "template": {"spec": head}}}},
    }))  # fmt: skip

    def refused(*args: str) -> str | None:
        stderr = cluster.attempt(*args, "--dry-run=server").stderr
        return None if "refused by a test policy" not in stderr else stderr

    eventually(lambda: refused("create", "-f", str(probe)), 30, "RayServices refused")
    eventually(
        lambda: refused(
            "patch",
            "tenant",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            '{"status":{"modelDeployments":7}}',
        ),
        30,
        "Tenant status updates refused",
    )
    yield namespace
    for name in (REFUSE_RAYSERVICES, REFUSE_TENANT_STATUS):
        cluster.run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                    name, "--ignore-not-found")  # fmt: skip


def test_a_failed_reconcile_is_retried_until_it_succeeds_whatever_else_fails(
    cluster: Kubectl, refusals: str
) -> None:
    """The retries of one deployment survive failures elsewhere (here the Tenant's status
    writes fail for good), and need no new event: the cause is removed behind the operator's
    back. The operator of 2026-12-01 retried from one thread that an error ended for good."""
    namespace = refusals
    cluster.apply(sample(namespace, "retried", adapters=[]))

    def failed() -> dict[str, Any] | None:
        md = get(cluster, "md", namespace, "retried")
        reconciled = condition(md or {}, "Reconciled")
        return md if reconciled.get("status") == "False" else None

    md = eventually(failed, 60, "Reconciled=False while RayServices are refused")
    assert "refused by a test policy" in condition(md, "Reconciled")["message"]
    # Long enough for every periodic pass of the operator to have met the failing Tenant.
    time.sleep(70)
    assert get(cluster, "rayservice", namespace, "retried") is None
    started = time.monotonic()
    cluster.run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                REFUSE_RAYSERVICES)  # fmt: skip
    ready = wait_ready(cluster, namespace, "retried", timeout=150)
    print(f"\nretried after the cause went: Ready in {time.monotonic() - started:.1f} s")
    assert condition(ready, "Reconciled")["status"] == "True"
    # The retry timer is gone with the failure, and so is kopf's finalizer for it.
    eventually(
        lambda: not (get(cluster, "md", namespace, "retried") or {})["metadata"].get("finalizers"),
        30,
        "no finalizer once Reconciled",
    )


def _uids(cluster: Kubectl, kind: str, namespace: str) -> dict[str, str]:
    items = cluster.json("get", kind, "-n", namespace)["items"]
    return {item["metadata"]["name"]: item["metadata"]["uid"] for item in items}


def _all_ready(cluster: Kubectl, namespace: str, count: int) -> bool:
    items = cluster.json("get", "md", "-n", namespace)["items"]
    return len(items) == count and all(
        condition(md, "Ready").get("status") == "True"
        and md["status"].get("observedGeneration") == md["metadata"]["generation"]
        for md in items
    )


def _one_child_each(cluster: Kubectl, namespace: str, deployments: dict[str, str]) -> None:
    """One RayService per ModelDeployment, owned by it, and one RayCluster each."""
    rayservices = cluster.json("get", "rayservice", "-n", namespace)["items"]
    assert sorted(r["metadata"]["name"] for r in rayservices) == sorted(deployments)
    for rayservice in rayservices:
        owner = rayservice["metadata"]["ownerReferences"][0]["uid"]
        assert owner == deployments[rayservice["metadata"]["name"]]
    clusters = cluster.json("get", "raycluster", "-n", namespace)["items"]
    owners = sorted(c["metadata"]["labels"]["tramontane.dev/model-deployment"] for c in clusters)
    assert owners == sorted(deployments), "exactly one RayCluster per deployment"


@contextlib.contextmanager
def _down(component: str, kill: bool = False) -> Iterator[None]:
    """The component stopped (SIGKILL with `kill`, as a crash) for the block, then started
    again, whatever the block did."""
    localcluster.stop(component, kill=kill)
    try:
        yield
    finally:
        localcluster.start(component)


def _api_server_answers(cluster: Kubectl) -> bool:
    return bool(cluster.run("get", "--raw", "/readyz", check=False).strip() == "ok")


def test_no_fault_baseline_30_deployments_ready(
    cluster: Kubectl, operator: OperatorProcess, tenant_namespace: str
) -> None:
    """What the recovery times below compare with: the same 30 deployments with no fault."""
    namespace = tenant_namespace
    started = time.monotonic()
    cluster.apply(*(sample(namespace, f"calm-{i:02d}", adapters=[]) for i in range(30)))
    eventually(lambda: _all_ready(cluster, namespace, 30), 240, "all 30 Ready", interval=2)
    print(f"\nno fault: all 30 Ready in {time.monotonic() - started:.1f} s")
    _one_child_each(cluster, namespace, _uids(cluster, "md", namespace))


def test_the_api_server_restarted_mid_rollout(
    cluster: Kubectl, operator: OperatorProcess, tenant_namespace: str
) -> None:
    namespace = tenant_namespace
    names = [f"rollout-{i:02d}" for i in range(30)]
    cluster.apply(*(sample(namespace, name, adapters=[]) for name in names))
    uids = _uids(cluster, "md", namespace)
    time.sleep(1.0)  # mid-rollout: some reconciled, some not
    with _down("kube-apiserver", kill=True):
        time.sleep(5)
    back = time.monotonic()
    eventually(lambda: _all_ready(cluster, namespace, 30), 240, "all 30 Ready", interval=2)
    print(f"\nAPI server back → all 30 Ready in {time.monotonic() - back:.1f} s")
    assert operator.process is not None and operator.process.poll() is None, "operator exited"
    assert _uids(cluster, "md", namespace) == uids
    _one_child_each(cluster, namespace, uids)


def test_etcd_restarted_loses_nothing(
    cluster: Kubectl, operator: OperatorProcess, tenant_namespace: str
) -> None:
    namespace = tenant_namespace
    names = [f"kept-{i}" for i in range(5)]
    cluster.apply(*(sample(namespace, name, adapters=[]) for name in names))
    eventually(lambda: _all_ready(cluster, namespace, 5), 120, "5 Ready", interval=1)
    before = {kind: _uids(cluster, kind, namespace) for kind in ("md", "rayservice", "raycluster")}
    statuses = {
        md["metadata"]["name"]: md["status"]
        for md in cluster.json("get", "md", "-n", namespace)["items"]
    }
    with _down("etcd", kill=True):
        time.sleep(5)
    eventually(lambda: _api_server_answers(cluster), 60, "the API server ready again")
    back = time.monotonic()
    # Changes made once etcd is back: a new deployment, and a new scaling maximum.
    cluster.apply(sample(namespace, "after", adapters=[]))
    cluster.run("patch", "md", "kept-0", "-n", namespace, "--type=merge",
                "-p", '{"spec":{"scaling":{"maxReplicas":3}}}')  # fmt: skip
    eventually(lambda: _all_ready(cluster, namespace, 6), 180, "all 6 Ready", interval=1)
    print(
        f"\netcd back → the change and the new deployment Ready in {time.monotonic() - back:.1f} s"
    )
    after = {kind: _uids(cluster, kind, namespace) for kind in ("md", "rayservice", "raycluster")}
    for kind, uids in before.items():
        assert {name: after[kind][name] for name in uids} == uids, f"{kind} replaced"
    for md in cluster.json("get", "md", "-n", namespace)["items"]:
        name = md["metadata"]["name"]
        if name in statuses and name != "kept-0":
            # Nothing changed for these: their status, transition times included, is kept.
            assert md["status"] == statuses[name]
    rayservice = get(cluster, "rayservice", namespace, "kept-0")
    assert rayservice is not None
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups[0]["maxReplicas"] == 3
    _one_child_each(cluster, namespace, after["md"])


def test_kuberay_stopped_for_a_minute_then_everything_converges(
    cluster: Kubectl, operator: OperatorProcess, tenant_namespace: str
) -> None:
    namespace = tenant_namespace
    cluster.apply(*(sample(namespace, f"early-{i}", adapters=[]) for i in range(3)))
    eventually(lambda: _all_ready(cluster, namespace, 3), 120, "3 Ready", interval=1)
    early_clusters = _uids(cluster, "raycluster", namespace)
    with _down("kuberay"):
        cluster.apply(*(sample(namespace, f"late-{i}", adapters=[]) for i in range(2)))
        cluster.run("patch", "md", "early-0", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"scaling":{"maxReplicas":3}}}')  # fmt: skip
        time.sleep(60)
        # Meanwhile the operator did its part and says what is missing.
        for name in ("late-0", "late-1"):
            assert get(cluster, "rayservice", namespace, name) is not None
            md = get(cluster, "md", namespace, name)
            assert md is not None and condition(md, "Ready").get("status") != "True"
    back = time.monotonic()
    eventually(lambda: _all_ready(cluster, namespace, 5), 180, "all 5 Ready", interval=1)
    print(f"\nKubeRay back → all 5 Ready in {time.monotonic() - back:.1f} s")
    after = _uids(cluster, "raycluster", namespace)
    assert {name: after.get(name) for name in early_clusters} == early_clusters
    _one_child_each(cluster, namespace, _uids(cluster, "md", namespace))


def _reconciles(operator: OperatorProcess) -> float:
    with urllib.request.urlopen(f"{operator.url}/metrics", timeout=5) as response:  # noqa: S310
        lines = response.read().decode().splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith("tramontane_reconcile_duration_seconds_count")
        and 'kind="ModelDeployment"' in line
    )


def test_a_fight_over_our_fields_is_won_without_hot_looping(
    cluster: Kubectl, operator: OperatorProcess, tenant_namespace: str
) -> None:
    """Another field manager keeps forcing a field of the RayService that we own, and sets one
    of its own: we take ours back every time, leave theirs, and reconcile about once per
    write of theirs."""
    namespace = tenant_namespace
    cluster.apply(sample(namespace, "contested", adapters=[]))
    wait_ready(cluster, namespace, "contested")
    intruder = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": "contested",
            "namespace": namespace,
            "annotations": {"intruder.example/note": "theirs"},
        },
        "spec": {"upgradeStrategy": {"type": "None"}},
    }
    before = _reconciles(operator)
    started = time.monotonic()
    writes = 20
    for _ in range(writes):
        cluster.run("apply", "--server-side", "--force-conflicts", "--field-manager=intruder",
                    "-f", "-", stdin=json.dumps(intruder))  # fmt: skip
        time.sleep(1.0)
    duration = time.monotonic() - started

    def ours_back() -> dict[str, Any] | None:
        rayservice = get(cluster, "rayservice", namespace, "contested")
        spec = (rayservice or {}).get("spec", {})
        return rayservice if spec.get("upgradeStrategy", {}).get("type") == "NewCluster" else None

    rayservice = eventually(ours_back, 30, "upgradeStrategy NewCluster again")
    assert rayservice["metadata"]["annotations"]["intruder.example/note"] == "theirs"
    time.sleep(5)  # the fight's last echoes
    reconciles = _reconciles(operator) - before
    print(f"\n{writes} forced writes in {duration:.1f} s: {reconciles:.0f} reconciles "
          f"({reconciles / duration:.2f}/s, {reconciles / writes:.1f} per write)")  # fmt: skip
    assert reconciles <= 5 * writes, "reconciling far more often than the other manager writes"
    # Quiet once the other manager stops.
    quiet = _reconciles(operator)
    time.sleep(10)
    assert _reconciles(operator) - quiet <= 2
    assert condition(get(cluster, "md", namespace, "contested") or {}, "Ready")["status"] == "True"


def _webhook_configuration(name: str, port: int, ca: bytes) -> dict[str, Any]:
    """Admission of ModelDeployments by one operator process, as the chart's configuration does
    it for the Service."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "modeldeployment.tramontane.dev",
                "clientConfig": {
                    "url": f"https://127.0.0.1:{port}/modeldeployment",
                    "caBundle": base64.b64encode(ca).decode(),
                },
                "rules": [
                    {
                        "apiGroups": ["tramontane.dev"],
                        "apiVersions": ["v1alpha1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["modeldeployments"],
                    }
                ],
                "admissionReviewVersions": ["v1"],
                "sideEffects": "NoneOnDryRun",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
            }
        ],
    }


def _reconciled_names(cluster: Kubectl, namespace: str) -> set[str]:
    return {
        md["metadata"]["name"]
        for md in cluster.json("get", "md", "-n", namespace)["items"]
        if condition(md, "Reconciled").get("status") == "True"
    }


def _admission_mode(process: OperatorProcess) -> str | None:
    """How a replica decides admissions, from its tramontane_admission_mode metric."""
    try:
        with urllib.request.urlopen(f"{process.url}/metrics", timeout=2) as response:  # noqa: S310
            lines = response.read().decode().splitlines()
    except OSError:
        return None  # dead: no endpoint
    for line in lines:
        if line.startswith("tramontane_admission_mode{") and line.endswith(" 1.0"):
            return str(line.split('mode="', 1)[1].split('"', 1)[0])
    return None


class ServiceEmulation:
    """The chart's webhook Service, emulated: it selects the pod the deciding replica labels,
    and these replicas are processes, not pods. Every 0.2 s, the webhook configuration is
    pointed at the replica whose metric says it decides (none while none does: no endpoints)."""

    def __init__(self, cluster: Kubectl, name: str, ca: bytes,
                 replicas: list[OperatorProcess]) -> None:  # fmt: skip
        self.cluster, self.name, self.ca, self.replicas = cluster, name, ca, replicas
        self.target: OperatorProcess | None = None
        self._stop = False

    def route(self, process: OperatorProcess | None) -> None:
        port = process.webhook_port if process else 1  # port 1: nothing listens
        self.cluster.apply(_webhook_configuration(self.name, port, self.ca))
        self.target = process

    def run(self) -> None:
        while not self._stop:
            deciding = [p for p in self.replicas if _admission_mode(p) in ("memory", "api")]
            wanted = deciding[0] if len(deciding) == 1 else None
            if wanted is not self.target:
                self.route(wanted)
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop = True


def test_the_active_replica_killed_while_200_are_created_the_standby_takes_over(
    cluster: Kubectl,
    operator: OperatorProcess,
    otel_collector: Collector,
    tmp_path: Path,
) -> None:
    """Two replicas peered as the chart runs them. Only the active one decides admissions (from
    memory, counting what it admitted in flight); a review reaching the standby is refused for a
    retry, and the webhook Service routes to the deciding one (emulated here). The active one is
    killed (-9) a third of the way through 200 creates: its peering record stops being
    refreshed, the standby resumes once it expires (peering.LIFETIME_S, 30 s), decides from the
    API while kopf lists everything again, and finishes the work. The clients retry refused
    creates, as controllers and `kubectl apply` loops do."""
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    cluster.run("apply", "-f", str(REPO / "policies/presets/unrestricted.yaml"))
    cluster.apply(tenant_manifest(namespace, "unrestricted", gpus=4000, deployments=250))
    cluster.run("wait", f"tenant/{namespace}", "--for=condition=Ready", "--timeout=60s")
    peering = f"tramontane-faults-{uuid.uuid4().hex[:6]}"
    cluster.run("apply", "--server-side", "-f", str(PEERING_CRD))
    cluster.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                   "metadata": {"name": peering}})  # fmt: skip
    certfile, keyfile = self_signed("127.0.0.1", tmp_path)
    environment = {
        "TRAMONTANE_PEERING": peering,
        "TRAMONTANE_WEBHOOK_CONFIG": "",  # ours below, as the chart's
        "TRAMONTANE_WEBHOOK_CERT": str(certfile),
        "TRAMONTANE_WEBHOOK_KEY": str(keyfile),
    }
    logs = operator.log_path.parent
    first = OperatorProcess(cluster.kubeconfig, logs / "operator-first.log",
                            otel_collector.endpoint, environment)  # fmt: skip
    second = OperatorProcess(cluster.kubeconfig, logs / "operator-second.log",
                             otel_collector.endpoint, environment)  # fmt: skip
    service = ServiceEmulation(cluster, peering, certfile.read_bytes(), [first, second])
    operator.stop()
    api = client.CustomObjectsApi(
        config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    )
    template = sample(namespace, "x", adapters=[])

    def create_once(name: str) -> None:
        body = {**template, "metadata": {"name": name, "namespace": namespace}}
        api.create_namespaced_custom_object(
            "tramontane.dev", "v1alpha1", namespace, "modeldeployments", body
        )

    try:
        first.start()
        time.sleep(2)  # older is higher: the first one is active
        second.start()
        eventually(lambda: _admission_mode(second) == "standby", 30, "the second one standing by")
        eventually(lambda: _admission_mode(first) == "memory", 60, "the first one deciding")
        # The standby, reached directly (a hand-over in flight), refuses for a retry.
        service.route(second)
        time.sleep(1)  # the API server's webhook client picks up the configuration
        with pytest.raises(ApiException) as refused:
            create_once("via-standby")
        assert refused.value.status == 503 and "standby" in str(refused.value.body)
        assert get(cluster, "md", namespace, "via-standby") is None
        routing = ThreadPoolExecutor(1)
        routing.submit(service.run)
        eventually(lambda: service.target is first, 10, "the Service routing to the active one")
        created: list[str] = []
        killed_at: list[float] = []
        admitted_after_kill: list[float] = []
        reconciled_at_kill: list[set[str]] = []

        def create(i: int) -> None:
            name = f"md-{i:03d}"
            deadline = time.monotonic() + 120
            while True:  # refused (no endpoint, the standby, a timeout on the kill): retried
                attempt = time.monotonic()
                try:
                    create_once(name)
                    break
                except ApiException as error:
                    if error.status == 409 or time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            created.append(name)
            if killed_at and attempt > killed_at[0] and not admitted_after_kill:
                admitted_after_kill.append(time.monotonic())  # asked and admitted since
            if len(created) == 66 and not killed_at:
                reconciled_at_kill.append(_reconciled_names(cluster, namespace))
                first.kill()
                killed_at.append(time.monotonic())

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(200)))
        print(f"\nadmissions resumed {admitted_after_kill[0] - killed_at[0]:.1f} s after the "
              f"kill; 200 created {time.monotonic() - killed_at[0]:.1f} s after it")  # fmt: skip

        def took_over() -> bool:
            return bool(_reconciled_names(cluster, namespace) - reconciled_at_kill[0])

        eventually(took_over, 120, "the standby reconciling", interval=0.5)
        print(f"take-over: the standby reconciled {time.monotonic() - killed_at[0]:.1f} s after "
              "the kill")  # fmt: skip
        eventually(lambda: len(_reconciled_names(cluster, namespace)) == 200, 300,
                   "all 200 Reconciled", interval=2)  # fmt: skip
        print(f"all 200 Reconciled {time.monotonic() - killed_at[0]:.1f} s after the kill")
        service.stop()
        routing.shutdown(wait=True)
        uids = _uids(cluster, "md", namespace)
        assert len(uids) == 200
        rayservices = cluster.json("get", "rayservice", "-n", namespace)["items"]
        assert sorted(r["metadata"]["name"] for r in rayservices) == sorted(uids)
        assert all(r["metadata"]["ownerReferences"][0]["uid"] == uids[r["metadata"]["name"]]
                   for r in rayservices)  # fmt: skip
        # KubeRay makes the RayClusters at its own pace (one RayService at a time, and each of
        # these asks a dashboard that the simulated pods do not run): none twice, is what
        # depends on us.
        clusters = cluster.json("get", "raycluster", "-n", namespace)["items"]
        owners = [c["metadata"]["labels"]["tramontane.dev/model-deployment"] for c in clusters]
        assert len(owners) == len(set(owners)), "two RayClusters for one deployment"
    finally:
        service.stop()
        first.kill()
        second.stop()
        cluster.run("delete", "validatingwebhookconfiguration", peering, "--ignore-not-found")
        cluster.run("delete", "clusterkopfpeering", peering, "--ignore-not-found")
        operator.start()
        cluster.run("delete", "md", "--all", "-n", namespace, "--wait=true", "--timeout=180s",
                    check=False, timeout=200)  # fmt: skip
        cluster.run("delete", "tenant", namespace, "--wait=false", check=False)


def _served_certificate(port: int) -> bytes:
    """The certificate the webhook server presents (DER)."""
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=5))


def _der(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


def _ca_bundle(cluster: Kubectl) -> str:
    configuration = cluster.json("get", "validatingwebhookconfiguration", "tramontane.dev")
    webhooks = configuration.get("webhooks") or [{}]  # none: kopf has not registered them yet
    return str(webhooks[0].get("clientConfig", {}).get("caBundle", ""))


def test_the_webhook_certificate_rotated_while_the_operator_runs(
    cluster: Kubectl,
    operator: OperatorProcess,
    otel_collector: Collector,
    tenant_namespace: str,
    tmp_path: Path,
) -> None:
    """A renewed certificate (cert-manager rewriting the mounted Secret: new key, new CA) is
    served without a restart, and the webhook configuration kopf manages gets the new CA."""
    namespace = tenant_namespace
    (tmp_path / "first").mkdir()
    (tmp_path / "renewed").mkdir()
    certfile, keyfile = self_signed("127.0.0.1", tmp_path / "first")
    environment = {"TRAMONTANE_WEBHOOK_CERT": str(certfile), "TRAMONTANE_WEBHOOK_KEY": str(keyfile)}
    own = OperatorProcess(cluster.kubeconfig, operator.log_path.parent / "operator-rotation.log",
                          otel_collector.endpoint, environment)  # fmt: skip
    operator.stop()
    try:
        own.start()
        # The stopped operator left the configuration without webhooks (kopf's cleanup): creates
        # would pass unreviewed until this one has registered its own.
        eventually(lambda: _ca_bundle(cluster) != "", 30, "the webhook registered")
        eventually(lambda: cluster.create_status(sample(namespace, "before", adapters=[])) == 201,
                   30, "a create admitted with the first certificate")  # fmt: skip
        first_bundle = _ca_bundle(cluster)
        assert _served_certificate(own.webhook_port) == _der(certfile)
        renewed_cert, renewed_key = self_signed("127.0.0.1", tmp_path / "renewed")
        keyfile.write_bytes(renewed_key.read_bytes())
        certfile.write_bytes(renewed_cert.read_bytes())
        rotated = time.monotonic()
        eventually(lambda: _served_certificate(own.webhook_port) == _der(renewed_cert),
                   30, "the renewed certificate served")  # fmt: skip
        served = time.monotonic() - rotated
        eventually(lambda: _ca_bundle(cluster) != first_bundle, 30, "the new CA in the webhook "
                   "configuration")  # fmt: skip
        attempts = iter(range(1000))
        eventually(
            lambda: (
                cluster.create_status(sample(namespace, f"after-{next(attempts)}", adapters=[]))
                == 201
            ),
            30,
            "a create admitted with the renewed certificate",
        )
        print(f"\nrenewed certificate served {served:.1f} s after the files changed; creates "
              f"admitted again after {time.monotonic() - rotated:.1f} s")  # fmt: skip
        assert own.process is not None and own.process.poll() is None, "the operator restarted"
    finally:
        own.stop()
        operator.start()
