"""The local cluster's real node (profile "node", e2e/realnode.py): its pods really run.

containerd, runc, the bridge CNI, the kubelet, kube-proxy and CoreDNS, built from their Go modules,
inside the cluster's network namespace. A pod under the `restricted` Pod Security Standard runs
our operator image (built by `make images`, imported into the node's containerd), serves HTTP
through a Service's ClusterIP, resolves names through cluster DNS, reaches the API server with
its token, and answers `kubectl logs` and `kubectl exec` (API server → kubelet → containerd).
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import localcluster
import realnode
from tests.kube import Kubectl, eventually

pytestmark = pytest.mark.skipif(
    not localcluster.REAL_NODE,
    reason="no real node: the cluster runs the simulated fleet only (profile kwok)",
)

IMAGE = "docker.io/tramontane/operator:dev"
TOLERATION = realnode.NODE_TOLERATION


def restricted_pod(name: str, command: list[str], **labels: str) -> dict[str, Any]:
    """A pod that passes the `restricted` Pod Security Standard, for the real node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "tolerations": [TOLERATION],
            "nodeSelector": {"kubernetes.io/hostname": realnode.NODE_NAME},
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                    "resources": {"limits": {"cpu": "100m", "memory": "128Mi"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                    },
                }
            ],
        },
    }


def create_pod(cluster: Kubectl, namespace: str, pod: dict[str, Any]) -> None:
    """Create the pod, waiting out the residency admission policies' start-up: until the API
    server has resolved their param kind (our CRD), they refuse every pod they match."""

    def created() -> bool:
        result = cluster.create(
            {**pod, "metadata": {**pod["metadata"], "namespace": namespace}}, check=False
        )
        if result.returncode == 0:
            return True
        assert "failed to find resource referenced by paramKind" in result.stderr, result.stderr
        return False

    eventually(created, 60, f"pod {pod['metadata']['name']} to be admitted")


def wait_ready(cluster: Kubectl, namespace: str, name: str, timeout: float = 120) -> None:
    """Wait for the pod to be Ready; a container that cannot start fails at once, with why."""

    def ready() -> bool:
        status = cluster.json("get", "pod", name, "-n", namespace).get("status", {})
        for container in status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") in (
                "ErrImageNeverPull",
                "CreateContainerError",
                "CrashLoopBackOff",
            ):
                pytest.fail(
                    f"pod {name}: {waiting['reason']}: {waiting.get('message')} (`make images`?)"
                )
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        )

    eventually(ready, timeout, f"pod {name} to be Ready")


@pytest.fixture
def restricted_namespace(crds: Kubectl) -> Iterator[str]:
    """A namespace that enforces the `restricted` Pod Security Standard."""
    cluster = crds
    name = f"node-{uuid.uuid4().hex[:8]}"
    cluster.run("create", "namespace", name)
    cluster.run(
        "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    yield name
    cluster.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def web(cluster: Kubectl, restricted_namespace: str) -> tuple[str, dict[str, Any]]:
    """An HTTP server pod (Python's http.server in our operator image) and a Service to it."""
    pod = restricted_pod(
        "web", ["python", "-m", "http.server", "8080", "--directory", "/opt"], app="web"
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": restricted_namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    create_pod(cluster, restricted_namespace, pod)
    cluster.apply(service)
    wait_ready(cluster, restricted_namespace, "web")
    return restricted_namespace, cluster.json("get", "pod", "web", "-n", restricted_namespace)


def test_the_node_is_ready_labelled_for_residency_and_tainted(cluster: Kubectl) -> None:
    node = cluster.json("get", "node", realnode.NODE_NAME)
    labels = node["metadata"]["labels"]
    assert labels["topology.kubernetes.io/region"] == realnode.NODE_REGION
    assert labels["topology.kubernetes.io/zone"] == realnode.NODE_ZONE
    assert realnode.NODE_TAINT in node["spec"]["taints"]
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_a_restricted_pod_runs_and_serves_through_its_service(
    cluster: Kubectl, web: tuple[str, dict[str, Any]]
) -> None:
    namespace, pod = web
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    assert pod["status"]["podIP"].startswith("10.244.0.")
    cluster_ip = cluster.json("get", "service", "web", "-n", namespace)["spec"]["clusterIP"]

    # ClusterIP → kube-proxy's nftables rules → the pod, from this process (in the namespace).
    def answered() -> int:
        try:
            with urllib.request.urlopen(f"http://{cluster_ip}/", timeout=3) as response:
                return int(response.status)
        except OSError:
            return 0

    assert eventually(answered, 30, "the Service's ClusterIP to answer") == 200

    # The request reached the container: http.server logs it (kubectl logs → kubelet).
    def request_logged() -> str | None:
        logs = cluster.run("logs", "web", "-n", namespace)
        return logs if "GET / " in logs else None

    logs = eventually(request_logged, 30, "the request in the pod's log")
    assert '"GET / HTTP/1.1" 200' in logs


def test_pods_resolve_services_and_reach_the_api_server_with_their_token(
    cluster: Kubectl, web: tuple[str, dict[str, Any]]
) -> None:
    namespace, _ = web
    script = (
        "import socket, ssl, urllib.request, json\n"
        f"print(socket.gethostbyname('web.{namespace}.svc.cluster.local'))\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "context = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "request = urllib.request.Request('https://kubernetes.default.svc/version', "
        "headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
        "print(json.load(urllib.request.urlopen(request, context=context))['gitVersion'])\n"
    )
    output = cluster.run("exec", "web", "-n", namespace, "--", "python", "-c", script)
    service_ip, version = output.split()
    assert service_ip == cluster.json("get", "service", "web", "-n", namespace)["spec"]["clusterIP"]
    assert version == localcluster.versions()["KUBERNETES_VERSION"]


def test_exec_runs_as_the_restricted_user_without_capabilities(
    cluster: Kubectl, web: tuple[str, dict[str, Any]]
) -> None:
    namespace, _ = web
    status = cluster.run("exec", "web", "-n", namespace, "--", "cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "65532"
    assert int(fields["CapEff"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # filter mode: RuntimeDefault


def test_a_pod_without_the_toleration_never_lands_on_the_real_node(
    cluster: Kubectl, restricted_namespace: str
) -> None:
    pod = restricted_pod("untolerated", ["python", "-c", "pass"])
    pod["spec"]["tolerations"] = []
    create_pod(cluster, restricted_namespace, pod)
    reason = eventually(
        lambda: next(
            (
                c.get("message", "")
                for c in cluster.json("get", "pod", "untolerated", "-n", restricted_namespace)
                .get("status", {})
                .get("conditions", [])
                if c["type"] == "PodScheduled" and c["status"] == "False"
            ),
            None,
        ),
        30,
        "the scheduler to refuse the pod",
    )
    assert "untolerated taint" in reason
