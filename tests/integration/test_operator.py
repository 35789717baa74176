"""The operator turns ModelDeployments into RayServices on the real control plane and KubeRay."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

import localcluster
from tests.kube import Kubectl, eventually
from tests.modeldeployments import condition, get, sample, wait_ready
from tests.operator_process import OperatorProcess
from tests.otelcol import Collector

REPO = Path(__file__).resolve().parents[2]


def worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    groups: list[dict[str, Any]] = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return groups[0]


def serve_args(rayservice: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args: dict[str, Any] = config["applications"][0]["args"]
    return args


def serve_autoscaling(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The engine deployment's autoscaling, from the Serve config's deployment override."""
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (engine,) = config["applications"][0]["deployments"]
    autoscaling: dict[str, Any] = engine["autoscaling_config"]
    return autoscaling


@pytest.fixture
def namespace(tenant_namespace: str) -> str:
    """ModelDeployments only live in tenant namespaces (the webhook refuses others)."""
    return tenant_namespace


@pytest.fixture
def restricted_namespace(cluster: Kubectl, namespace: str) -> str:
    """Tenant namespaces enforce the `restricted` Pod Security Standard."""
    labels = cluster.json("get", "namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    return namespace


def test_sample_becomes_a_ready_rayservice_on_h100_nodes(
    cluster: Kubectl, operator: OperatorProcess, restricted_namespace: str
) -> None:
    ns = restricted_namespace
    cluster.apply(sample(ns))
    md = wait_ready(cluster, ns, "llama-3-8b")

    rayservice = get(cluster, "rayservice", ns, "llama-3-8b")
    assert rayservice is not None
    owner = rayservice["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ModelDeployment" and owner["controller"] is True
    assert owner["uid"] == md["metadata"]["uid"]
    assert serve_args(rayservice)["model"]["servedName"] == "llama-3.1-8b-instruct"
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert get(cluster, "podmonitor", ns, "llama-3-8b") is not None

    # KubeRay created the cluster; Pod Security admission (restricted) let every pod in.
    pods = cluster.json("get", "pods", "-n", ns, "-l", "tramontane.dev/model-deployment=llama-3-8b")
    nodes = {n["metadata"]["name"]: n for n in cluster.json("get", "nodes")["items"]}
    workers = [p for p in pods["items"] if p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
    assert len(workers) == 1
    for pod in workers:
        assert pod["status"]["phase"] == "Running"
        labels = nodes[pod["spec"]["nodeName"]]["metadata"]["labels"]
        assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    status = md["status"]
    assert status["replicas"] == 1 and status["readyReplicas"] == 1
    assert status["endpoint"] == f"http://llama-3-8b-serve-svc.{ns}.svc.cluster.local:8000/v1"
    for kind in ("Reconciled", "Available", "Ready"):
        cond = condition(md, kind)
        assert cond["status"] == "True", cond
        assert cond["observedGeneration"] == md["metadata"]["generation"]
        assert cond["reason"] and cond["message"] and cond["lastTransitionTime"]
    events = cluster.json(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.kind=ModelDeployment"
    )
    assert "Ready" in {e["reason"] for e in events["items"]}


def test_ready_only_once_workers_are_ready(
    cluster: Kubectl, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    # The only A100 node is cordoned: the worker stays Pending, the deployment must not be Ready.
    node_name = f"a100-{namespace}"
    nodes = {
        "pools": {"a100": {"instanceType": "p4de.24xlarge", "cpu": "96", "memory": "1152Gi",
                           "pods": "110", "gpus": 8, "gpuProduct": "NVIDIA-A100-SXM4-80GB",
                           "gpuMemoryMiB": 81920}},
        "nodes": [{"name": node_name, "pool": "a100", "region": "eu-west-3", "zone": "eu-west-3c"}],
    }  # fmt: skip
    (tmp_path / "nodes.yaml").write_text(yaml.safe_dump(nodes))
    localcluster.apply_nodes(tmp_path / "nodes.yaml")
    cluster.run("cordon", node_name)
    cluster.apply(sample(namespace, "on-a100", accelerator={"type": "A100", "count": 1}))

    def waiting() -> dict[str, Any] | None:
        md = get(cluster, "md", namespace, "on-a100")
        return md if md and condition(md, "Available").get("reason") == "ReplicasNotReady" else None

    md = eventually(waiting, 60, "Available=False with ReplicasNotReady")
    assert condition(md, "Ready")["status"] == "False"
    assert md["status"]["readyReplicas"] == 0

    cluster.run("uncordon", node_name)
    try:
        md = wait_ready(cluster, namespace, "on-a100", timeout=120)
        assert md["status"]["readyReplicas"] == 1
    finally:
        cluster.run("delete", "md", "on-a100", "-n", namespace, "--wait=true")
        cluster.run("delete", "node", node_name, "--wait=false")


def test_spec_changes_and_scale_flow_into_the_rayservice(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(sample(namespace))
    wait_ready(cluster, namespace, "llama-3-8b")

    cluster.run(
        "patch", "md", "llama-3-8b", "-n", namespace, "--type=merge", "-p",
        json.dumps({"spec": {"scaling": {"maxReplicas": 6}, "model": {"revision": "v2-pinned"}}}),
    )  # fmt: skip

    def updated() -> dict[str, Any] | None:
        rs = get(cluster, "rayservice", namespace, "llama-3-8b")
        ok = (
            rs
            and worker_group(rs)["maxReplicas"] == 6
            and serve_args(rs)["model"]["revision"] == "v2-pinned"
            and serve_autoscaling(rs)["max_replicas"] == 6
        )
        return rs if ok else None

    eventually(updated, 30, "RayService to follow maxReplicas and the model revision")
    md = wait_ready(cluster, namespace, "llama-3-8b")
    assert md["status"]["observedGeneration"] == 2

    cluster.run("scale", "md/llama-3-8b", "-n", namespace, "--replicas=3")
    rs = eventually(
        lambda: (
            (r := get(cluster, "rayservice", namespace, "llama-3-8b"))
            and worker_group(r)["replicas"] == 3
            and r
        ),
        30,
        "RayService worker replicas to follow `kubectl scale`",
    )
    assert serve_autoscaling(rs)["initial_replicas"] == 3
    scale_path = (
        f"/apis/tramontane.dev/v1alpha1/namespaces/{namespace}/modeldeployments/llama-3-8b/scale"
    )
    scale = json.loads(cluster.run("get", "--raw", scale_path))
    assert scale["spec"]["replicas"] == 3
    assert (
        scale["status"]["selector"]
        == "tramontane.dev/model-deployment=llama-3-8b,ray.io/node-type=worker"
    )


def test_a_new_scaling_maximum_reaches_the_running_raycluster_in_place(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    """KubeRay does not pass new worker bounds on to a running cluster; the operator does, so
    that the Ray autoscaler may add the workers Serve asks for, without a new cluster."""
    cluster.apply(sample(namespace, "bounded"))
    name = wait_ready(cluster, namespace, "bounded")["status"]["rayClusterName"]
    scaling = {"spec": {"scaling": {"minReplicas": 2, "maxReplicas": 7}}}
    cluster.run(
        "patch", "md", "bounded", "-n", namespace, "--type=merge", "-p", json.dumps(scaling)
    )

    def bounds() -> tuple[int, int] | None:
        raycluster = get(cluster, "raycluster", namespace, name)
        group = (
            worker_group({"spec": {"rayClusterConfig": raycluster["spec"]}}) if raycluster else {}
        )
        found = (group.get("minReplicas"), group.get("maxReplicas"))
        return found if found == (2, 7) else None

    eventually(bounds, 30, "the RayCluster's worker group to allow 2..7 workers")
    md = wait_ready(cluster, namespace, "bounded")
    assert md["status"]["rayClusterName"] == name  # the same cluster: no rebuild
    cluster.run("delete", "md", "bounded", "-n", namespace, "--wait=true")


def test_unchanged_spec_writes_nothing(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(sample(namespace))
    wait_ready(cluster, namespace, "llama-3-8b")
    time.sleep(3)  # let the status updates of KubeRay settle

    def our_write_time(obj: dict[str, Any]) -> list[str]:
        return [m["time"] for m in obj["metadata"]["managedFields"] if m["manager"] == "tramontane"]

    rs_before = get(cluster, "rayservice", namespace, "llama-3-8b")
    pm_before = get(cluster, "podmonitor", namespace, "llama-3-8b")
    md_before = get(cluster, "md", namespace, "llama-3-8b")
    assert rs_before and pm_before and md_before
    # Touch the ModelDeployment without changing its spec: it triggers reconciles.
    for i in range(3):
        cluster.run("annotate", "md", "llama-3-8b", "-n", namespace, f"touched=t{i}", "--overwrite")
    time.sleep(5)
    rs_after = get(cluster, "rayservice", namespace, "llama-3-8b")
    pm_after = get(cluster, "podmonitor", namespace, "llama-3-8b")
    md_after = get(cluster, "md", namespace, "llama-3-8b")
    assert rs_after and pm_after and md_after
    assert pm_after["metadata"]["resourceVersion"] == pm_before["metadata"]["resourceVersion"]
    assert rs_after["metadata"]["generation"] == rs_before["metadata"]["generation"]
    assert our_write_time(rs_after) == our_write_time(rs_before)
    assert md_after["status"] == md_before["status"]


def test_drifted_and_deleted_rayservice_is_restored(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(sample(namespace))
    wait_ready(cluster, namespace, "llama-3-8b")
    group = worker_group(get(cluster, "rayservice", namespace, "llama-3-8b") or {})
    patch = {"spec": {"rayClusterConfig": {"workerGroupSpecs": [{**group, "maxReplicas": 40}]}}}
    cluster.run(
        "patch",
        "rayservice",
        "llama-3-8b",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(patch),
    )
    started = time.monotonic()
    eventually(
        lambda: (
            (rs := get(cluster, "rayservice", namespace, "llama-3-8b"))
            and worker_group(rs)["maxReplicas"] == 4
        ),
        30,
        "the edited RayService to be restored",
    )
    restored_edit = time.monotonic() - started

    old_uid = (get(cluster, "rayservice", namespace, "llama-3-8b") or {})["metadata"]["uid"]
    cluster.run("delete", "rayservice", "llama-3-8b", "-n", namespace, "--wait=false")
    started = time.monotonic()
    eventually(
        lambda: (
            (rs := get(cluster, "rayservice", namespace, "llama-3-8b"))
            and rs["metadata"]["uid"] != old_uid
        ),
        30,
        "the deleted RayService to be recreated",
    )
    restored_delete = time.monotonic() - started
    print(f"edit restored in {restored_edit:.1f}s, deletion in {restored_delete:.1f}s")


def test_a_raycluster_edited_around_the_operator_is_put_back_in_place(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    """Someone with write access to RayClusters (a leaked KubeRay token, a guard switched off)
    swaps the worker image and smuggles in a worker group: KubeRay would never undo it."""
    cluster.apply(sample(namespace))
    wait_ready(cluster, namespace, "llama-3-8b")
    (before,) = cluster.json("get", "raycluster", "-n", namespace, "-l",
                             "tramontane.dev/model-deployment=llama-3-8b")["items"]  # fmt: skip
    name = before["metadata"]["name"]
    image = before["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    smuggled = {**before["spec"]["workerGroupSpecs"][0], "groupName": "smuggled"}
    cluster.run("patch", "raycluster", name, "-n", namespace, "--type=json", "-p", json.dumps([
        {"op": "replace", "value": "docker.io/attacker/miner:latest",
         "path": "/spec/workerGroupSpecs/0/template/spec/containers/0/image"},
        {"op": "add", "path": "/spec/workerGroupSpecs/-", "value": smuggled},
    ]))  # fmt: skip
    started = time.monotonic()

    def restored() -> dict[str, Any] | None:
        now = get(cluster, "raycluster", namespace, name) or {}
        groups = now.get("spec", {}).get("workerGroupSpecs", [])
        images = [g["template"]["spec"]["containers"][0]["image"] for g in groups]
        return now if images == [image] else None

    after = eventually(restored, 30, "the RayCluster's image and worker groups put back")
    print(f"RayCluster drift reverted in {time.monotonic() - started:.1f}s")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # in place, no new cluster
    events = cluster.json("get", "events.events.k8s.io", "-n", namespace, "--field-selector",
                          "regarding.name=llama-3-8b")["items"]  # fmt: skip
    reverts = [e for e in events if e["reason"] == "DriftReverted"]
    assert reverts and all(e["type"] == "Warning" and name in e["note"] for e in reverts)
    notes = " ".join(e["note"] for e in reverts)
    assert "containers[0].image" in notes and "workerGroupSpecs[smuggled] added" in notes
    wait_ready(cluster, namespace, "llama-3-8b")


def test_deleting_the_modeldeployment_removes_every_child(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(sample(namespace))
    wait_ready(cluster, namespace, "llama-3-8b")
    cluster.run("delete", "md", "llama-3-8b", "-n", namespace, "--wait=true")

    def all_gone() -> bool:
        leftovers = cluster.run(
            "get", "rayservice,raycluster,podmonitor,pods", "-n", namespace, "-o", "name"
        )
        return not leftovers.strip()

    eventually(all_gone, 60, "garbage collection of RayService, RayCluster, PodMonitor and pods")


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    names = [f"md-{i:02d}" for i in range(20)]
    cluster.apply(*(sample(namespace, name, adapters=[]) for name in names))
    time.sleep(1.0)  # some reconciled, some not, some half-way
    operator.kill()
    operator.start()

    def converged() -> bool:
        mds = cluster.json("get", "md", "-n", namespace)["items"]
        return len(mds) == 20 and all(condition(m, "Ready").get("status") == "True" for m in mds)

    eventually(converged, 180, "all 20 ModelDeployments Ready after the restart", interval=2)
    rayservices = cluster.json("get", "rayservice", "-n", namespace)["items"]
    assert sorted(r["metadata"]["name"] for r in rayservices) == names
    uids = {m["metadata"]["uid"] for m in cluster.json("get", "md", "-n", namespace)["items"]}
    assert all(r["metadata"]["ownerReferences"][0]["uid"] in uids for r in rayservices)
    clusters = cluster.json("get", "raycluster", "-n", namespace)["items"]
    owners = sorted(c["metadata"]["labels"]["tramontane.dev/model-deployment"] for c in clusters)
    assert owners == names, "exactly one RayCluster per deployment"


def test_operator_serves_metrics_and_probes(operator: OperatorProcess) -> None:
    with urllib.request.urlopen(f"{operator.url}/metrics", timeout=5) as response:  # noqa: S310
        metrics = response.read().decode()
    assert 'tramontane_reconcile_total{kind="ModelDeployment",result="success"}' in metrics
    assert "tramontane_reconcile_duration_seconds_bucket" in metrics
    assert (
        'tramontane_managed_objects{condition="Ready",kind="ModelDeployment",status="True"}'
        in metrics
    )
    for probe in ("healthz", "readyz"):
        with urllib.request.urlopen(f"{operator.url}/{probe}", timeout=5) as response:  # noqa: S310
            assert response.status == 200


def test_each_reconcile_exports_an_opentelemetry_span_over_otlp(
    cluster: Kubectl, operator: OperatorProcess, otel_collector: Collector, namespace: str
) -> None:
    cluster.apply(sample(namespace, "traced"))
    wait_ready(cluster, namespace, "traced")
    # The reconcile that saw the deployment Ready exported a span saying so (spans are batched:
    # wait for it rather than take the last one received).
    spans = eventually(
        lambda: otel_collector.find(
            "reconcile ModelDeployment",
            **{"tramontane.tenant": namespace, "tramontane.ready": "True"},
        ),
        15,
        "a reconcile span of the Ready deployment at the OpenTelemetry Collector",
    )
    span = spans[-1]
    assert span.service == "tramontane-operator"
    assert span.attributes["tramontane.deployment"] == "traced"
    assert span.attributes["tramontane.model"] == "llama-3.1-8b-instruct"


def test_a_missing_model_claim_is_reported_until_the_claim_appears(
    cluster: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(sample(namespace, "on-claim", model={"uri": "pvc://weights/llama-3-8b",
                                                       "servedName": "llama"}))  # fmt: skip

    def reported(reason: str) -> Any:
        def check() -> dict[str, Any] | None:
            md = get(cluster, "md", namespace, "on-claim")
            return md if md and condition(md, "ModelSourceReady").get("reason") == reason else None

        return check

    md = eventually(reported("ClaimNotFound"), 60, "ModelSourceReady=False ClaimNotFound")
    assert condition(md, "ModelSourceReady")["status"] == "False"
    assert "weights" in condition(md, "ModelSourceReady")["message"]
    assert condition(md, "Ready")["reason"] == "ClaimNotFound"
    # The operator watches claims: a bound claim turns the condition without touching the spec.
    volume = f"{namespace}-weights"
    cluster.apply(
        {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                     "storageClassName": "", "claimRef": {"namespace": namespace,
                                                          "name": "weights"},
                     "hostPath": {"path": "/nonexistent-weights"}},
        },
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "weights", "namespace": namespace},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                     "volumeName": volume, "resources": {"requests": {"storage": "1Gi"}}},
        },
    )  # fmt: skip
    try:
        md = eventually(reported("ClaimBound"), 60, "ModelSourceReady=True ClaimBound")
        assert condition(md, "ModelSourceReady")["status"] == "True"
        assert md["metadata"]["generation"] == 1
    finally:
        cluster.run("delete", "md", "on-claim", "-n", namespace, "--wait=true")
        cluster.run("delete", "pvc", "weights", "-n", namespace, "--wait=false")
        cluster.run("delete", "pv", volume, "--wait=false")
