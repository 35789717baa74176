"""The whole chain for real, as a user goes, on the local cluster's real node (profile "node").

`helm install` runs the operator as a pod (our image, the chart's ServiceAccount, the webhook
served from the pod through its Service with the chart's certificate) and `helm test` runs; a
ResidencyPolicy and a Tenant; the tiny test model on a PersistentVolume and claim in the tenant's
namespace; a ModelDeployment on CPU. Then KubeRay starts the Ray head and worker pods, which run
our serving image under the restricted Pod Security Standard, deploys the Serve application, and
the official `openai` client calls the endpoint through the Kubernetes Service (its ClusterIP,
through kube-proxy) with a key from the tenant's Secret.

What cannot exist here: GPUs (the deployment uses accelerator CPU). Nothing else is simulated.
Times are printed and written to .cluster/full-chain.json.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import localcluster
import realnode
from tests.integration.conftest import OperatorProcess
from tests.integration.test_chart import CHART, ROOT, helm
from tests.kube import Kubectl, eventually, tenant_manifest
from tramontane.serving import testmodel

pytestmark = pytest.mark.skipif(
    not localcluster.REAL_NODE, reason="no real node: the cluster runs the simulated fleet only"
)

ADAPTER = "finance-reports"
SERVED_NAME = "tiny-llama"
TOLERATION = realnode.NODE_TOLERATION
REPORT = localcluster.STATE / "full-chain.json"


@dataclass
class Chain:
    """The installed chain and what a client needs to call it."""

    cluster: Kubectl
    release_namespace: str
    namespace: str
    deployment: str
    key: str
    model_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def endpoint(self) -> str:
        service = self.cluster.json(
            "get", "service", f"{self.deployment}-serve-svc", "-n", self.namespace
        )
        return f"http://{service['spec']['clusterIP']}:8000/v1"

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.endpoint(), api_key=key or self.key, timeout=120)


def _values() -> list[str]:
    """The chart's values for this cluster: our images, on the real node, small Ray pods."""
    on_node = f"operator.nodeSelector.kubernetes\\.io/hostname={realnode.NODE_NAME}"
    toleration = json.dumps([TOLERATION])
    return [
        "--set", "operator.image.repository=docker.io/tramontane/operator",
        "--set", "operator.image.tag=dev",
        "--set", "operator.image.pullPolicy=Never",
        "--set", "operator.replicas=1",
        "--set", on_node,
        "--set-json", f"operator.tolerations={toleration}",
        "--set", "serving.image=docker.io/tramontane/serving:dev",
        "--set-json", f"serving.tolerations={toleration}",
        # Two cores for everything: head 300m + autoscaler 100m, one 1-core engine worker.
        "--set", "serving.resources.head.cpu=300m",
        "--set", "serving.resources.head.memory=3Gi",
        "--set", "serving.resources.cpuWorker.cpu=1",
        "--set", "serving.resources.cpuWorker.memory=5Gi",
        "--set", "serving.resources.autoscaler.cpu=100m",
        "--set", "serving.resources.autoscaler.memory=256Mi",
    ]  # fmt: skip


def _timed(chain: Chain, step: str, started: float) -> None:
    chain.seconds[step] = round(time.monotonic() - started, 1)
    print(f"[full chain] {step}: {chain.seconds[step]} s")


def _model_on_a_volume(cluster: Kubectl, namespace: str, model_dir: Path) -> list[dict[str, Any]]:
    """A PersistentVolume holding the test model and its adapters, and the tenant's claim to it
    (as a platform team provisions weights: the tenant only names the claim)."""
    volume = f"{namespace}-models"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": "models"},
                "hostPath": {"path": str(model_dir.parent), "type": "Directory"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def _modeldeployment(namespace: str, model_dir: Path) -> dict[str, Any]:
    adapter_dir = testmodel.ensure_adapter(model_dir, ADAPTER)
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "tiny", "namespace": namespace},
        "spec": {
            "model": {"uri": f"pvc://models/{model_dir.name}", "servedName": SERVED_NAME},
            "adapters": [
                {
                    "name": ADAPTER,
                    "uri": f"pvc://models/{adapter_dir.parent.name}/{adapter_dir.name}",
                }
            ],
            "engine": {"maxModelLen": 2048, "dtype": "bfloat16"},
            "accelerator": {"type": "CPU", "count": 0},
            "scaling": {"minReplicas": 1, "maxReplicas": 1},
        },
    }


def _app_status(cluster: Kubectl, namespace: str, name: str) -> str | None:
    status = cluster.json("get", "rayservice", name, "-n", namespace).get("status", {})
    apps = status.get("activeServiceStatus", {}).get("applicationStatuses", {})
    return str(apps.get(name, {}).get("status")) if apps else None


@pytest.fixture(scope="module")
def chain(crds: Kubectl, operator: OperatorProcess) -> Iterator[Chain]:
    cluster = crds
    suffix = uuid.uuid4().hex[:5]
    release, release_namespace = f"e2e{suffix}", f"tramontane-e2e{suffix}"
    tenant, policy = f"e2e-{suffix}", f"e2e-local-{suffix}"
    model_dir = testmodel.ensure_model()
    chain = Chain(
        cluster, release_namespace, tenant, "tiny", f"sk-e2e-{uuid.uuid4().hex}", model_dir
    )
    # One operator per cluster: the suite's own steps aside, and with it its webhook
    # configuration and the admission policies the chart owns.
    operator.stop()
    cluster.run("delete", "validatingwebhookconfiguration", "tramontane.dev", "--ignore-not-found")
    cluster.run("delete", "-f", str(ROOT / "policies/admission"), "--ignore-not-found")
    cluster.run("create", "namespace", release_namespace)
    cluster.run(
        "label", "namespace", release_namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    try:
        started = time.monotonic()
        helm(
            "install", release, str(CHART), "--namespace", release_namespace, "--wait",
            "--timeout", "180s", *_values(), kubeconfig=cluster.kubeconfig,
        )  # fmt: skip
        _timed(chain, "helm install (operator pod Ready)", started)
        started = time.monotonic()
        test = helm("test", release, "-n", release_namespace, "--timeout", "120s",
                    kubeconfig=cluster.kubeconfig)  # fmt: skip
        assert "Phase:          Succeeded" in test.stdout, test.stdout
        _timed(chain, "helm test", started)

        cluster.apply(
            {
                "apiVersion": "tramontane.dev/v1alpha1",
                "kind": "ResidencyPolicy",
                "metadata": {"name": policy},
                "spec": {
                    "jurisdiction": "EU",
                    "regions": [realnode.NODE_REGION],
                    "modelSources": ["pvc://**"],
                },
            },
            tenant_manifest(tenant, policy, gpus=0, deployments=2),
        )
        cluster.run("wait", f"tenant/{tenant}", "--for=condition=Ready", "--timeout=60s")
        cluster.apply(*_model_on_a_volume(cluster, tenant, model_dir))
        cluster.run(
            "create", "secret", "generic", "tiny-api-keys", "-n", tenant,
            f"--from-literal=e2e-client={chain.key}",
        )  # fmt: skip

        started = time.monotonic()
        cluster.create(_modeldeployment(tenant, model_dir))
        premature: list[str] = []

        def running() -> bool:
            # Ready before the application runs would send clients to an endpoint that fails.
            # The application's status is read around the deployment's, so that a transition
            # between two reads is not taken for a premature Ready.
            before = _app_status(cluster, tenant, "tiny")
            md = cluster.json("get", "md", "tiny", "-n", tenant).get("status", {})
            after = _app_status(cluster, tenant, "tiny")
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in md.get("conditions", [])
            )
            if ready and before == after and after not in (None, "RUNNING"):
                premature.append(f"Ready while the application is {after}")
            return after == "RUNNING"

        eventually(
            running,
            600,
            "the Serve application to be RUNNING (KubeRay, through the Ray dashboard)",
            interval=2,
        )
        assert not premature, premature
        _timed(chain, "kubectl apply → Serve app RUNNING", started)
        eventually(lambda: _answers(chain), 120, "the endpoint to answer through its Service")
        _timed(chain, "kubectl apply → first answer through the Service", started)
        yield chain
    finally:
        REPORT.write_text(json.dumps(chain.seconds, indent=2) + "\n")
        cluster.run("delete", "md", "--all", "-n", tenant, "--wait=true", "--timeout=120s",
                    check=False)  # fmt: skip
        cluster.run("delete", "tenant", tenant, "--wait=false", check=False)
        cluster.run("delete", "pv", f"{tenant}-models", "--ignore-not-found", check=False)
        cluster.run("delete", "residencypolicy", policy, "--ignore-not-found", check=False)
        helm("uninstall", release, "-n", release_namespace, "--wait", "--timeout", "120s",
             kubeconfig=cluster.kubeconfig, check=False)  # fmt: skip
        cluster.run("delete", "namespace", release_namespace, "--wait=false", check=False)
        cluster.run("delete", "clusterkopfpeering", f"{release}-tramontane", "--ignore-not-found",
                    check=False)  # fmt: skip
        cluster.run("apply", "--server-side", "--force-conflicts", "-f",
                    str(ROOT / "policies/admission"))  # fmt: skip
        operator.start()


def _answers(chain: Chain) -> bool:
    try:
        return bool(chain.client().models.list().data)
    except (openai.APIConnectionError, openai.APIStatusError):
        return False


def test_the_operator_runs_as_a_pod_and_serves_the_webhook_through_its_service(
    chain: Chain,
) -> None:
    cluster = chain.cluster
    (pod,) = cluster.json(
        "get", "pods", "-n", chain.release_namespace, "-l", "app.kubernetes.io/component=operator"
    )["items"]
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    assert pod["spec"]["containers"][0]["image"] == "docker.io/tramontane/operator:dev"
    # The API server calls the webhook in the pod (through its Service, with the chart's CA):
    # a model source outside the tenant's policy is refused there.
    outside = _modeldeployment(chain.namespace, chain.model_dir)
    outside["metadata"]["name"] = "outside"
    outside["spec"]["model"]["uri"] = "s3://somewhere-else/llama"
    outside["spec"]["adapters"] = []
    result = cluster.create(outside, check=False)
    assert result.returncode != 0
    assert 'admission webhook "modeldeployment.tramontane.dev" denied' in result.stderr
    assert "modelSources" in result.stderr, result.stderr


def test_ray_pods_run_restricted_on_the_real_node_and_the_deployment_is_ready(
    chain: Chain,
) -> None:
    cluster = chain.cluster
    pods = cluster.json(
        "get",
        "pods",
        "-n",
        chain.namespace,
        "-l",
        f"tramontane.dev/model-deployment={chain.deployment}",
    )["items"]
    kinds = sorted(p["metadata"]["labels"]["ray.io/node-type"] for p in pods)
    assert kinds == ["head", "worker"]
    for pod in pods:
        assert pod["spec"]["nodeName"] == realnode.NODE_NAME
        assert pod["status"]["phase"] == "Running"
        ready = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True", pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    namespace = cluster.json("get", "namespace", chain.namespace)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    md = cluster.json("get", "md", chain.deployment, "-n", chain.namespace)
    conditions = {c["type"]: c["status"] for c in md["status"]["conditions"]}
    assert conditions["Ready"] == "True", md["status"]
    assert md["status"]["endpoint"].startswith(f"http://{chain.deployment}-serve-svc.")


def test_the_openai_client_is_answered_through_the_kubernetes_service(chain: Chain) -> None:
    client = chain.client()
    assert [m.id for m in client.models.list().data] == [SERVED_NAME, ADAPTER]
    tokenizer = testmodel.load_tokenizer(chain.model_dir)
    messages = [{"role": "user", "content": "Bonjour"}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = tokenizer.decode(testmodel.greedy_continuation(tokenizer, prompt_ids, 12))
    chat = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
    )
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    # The adapter by its own name: the test adapter forces its token at every step.
    completion = client.completions.create(
        model=ADAPTER, prompt="Quarterly revenue of", max_tokens=6, temperature=0
    )
    forced = tokenizer.decode([testmodel.forced_token(tokenizer, ADAPTER)] * 6)
    assert completion.choices[0].text == forced
    with pytest.raises(openai.AuthenticationError):
        chain.client(key="sk-not-a-key").models.list()
    assert httpx.get(f"{chain.endpoint()}/models", timeout=30).status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model",
            messages=messages,
            max_tokens=2,
        )
