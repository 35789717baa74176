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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml

import fullchain
import localcluster
import realnode
import testmodel
from fullchain import ADAPTER, CHART, ROOT, SERVED_NAME, chart_values, helm
from tests.kube import Kubectl, KubectlError, eventually, tenant_manifest
from tests.operator_process import OperatorProcess
from tramontane.api.serving import engine_deployment_name

T = TypeVar("T")

pytestmark = [
    pytest.mark.skipif(
        not localcluster.REAL_NODE, reason="no real node: the cluster runs the simulated fleet only"
    ),
    # The first test also pays for the chain's setup: on a freshly started node (cold page cache,
    # images just imported) two Ray pods and a vLLM engine start on a fraction of 2 cores.
    pytest.mark.timeout(1800),
]

REPORT = localcluster.STATE / "full-chain.json"


@dataclass
class Chain:
    """The installed chain and what a client needs to call it."""

    cluster: Kubectl
    release: str
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


def _timed(chain: Chain, step: str, started: float) -> None:
    chain.seconds[step] = round(time.monotonic() - started, 1)
    print(f"[full chain] {step}: {chain.seconds[step]} s")


def _modeldeployment(namespace: str, model_dir: Path) -> dict[str, Any]:
    adapter_dir = testmodel.ensure_adapter(model_dir, ADAPTER)
    return fullchain.modeldeployment(namespace, model_dir, adapter_dir)


def _app_status(cluster: Kubectl, namespace: str, name: str) -> str | None:
    """The Serve application's status; None before there is one (or a RayService at all: the
    first poll can come before the operator's first reconcile)."""
    out = cluster.run("get", "rayservice", name, "-n", namespace, "-o", "json",
                      "--ignore-not-found")  # fmt: skip
    status = json.loads(out).get("status", {}) if out.strip() else {}
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
        cluster, release, release_namespace, tenant, "tiny", f"sk-e2e-{uuid.uuid4().hex}", model_dir
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
            "--timeout", "180s", *chart_values(), kubeconfig=cluster.kubeconfig,
        )  # fmt: skip
        _timed(chain, "helm install (operator pod Ready)", started)
        started = time.monotonic()
        test = helm("test", release, "-n", release_namespace, "--timeout", "120s",
                    kubeconfig=cluster.kubeconfig)  # fmt: skip
        assert "Phase:          Succeeded" in test.stdout, test.stdout
        _timed(chain, "helm test", started)

        cluster.apply(
            fullchain.residency_policy(policy),
            tenant_manifest(tenant, policy, gpus=0, deployments=2),
        )
        cluster.run("wait", f"tenant/{tenant}", "--for=condition=Ready", "--timeout=60s")
        cluster.apply(*fullchain.model_volume(tenant, model_dir))
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

        try:
            eventually(
                running,
                1200,
                "the Serve application to be RUNNING (KubeRay, through the Ray dashboard)",
                interval=2,
            )
        except AssertionError as timeout:
            md = cluster.json("get", "md", "tiny", "-n", tenant).get("status", {})
            conditions = [
                f"{c['type']}={c['status']} {c.get('reason')}: {c.get('message', '')[-400:]}"
                for c in md.get("conditions", [])
            ]
            pods = cluster.run("get", "pods", "-n", tenant, "-o", "wide", check=False)
            raise AssertionError(f"{timeout}\nconditions: {conditions}\npods:\n{pods}") from None
        assert not premature, premature
        _timed(chain, "kubectl apply → Serve app RUNNING", started)
        eventually(lambda: _answers(chain), 120, "the endpoint to answer through its Service")
        _timed(chain, "kubectl apply → first answer through the Service", started)
        yield chain
    finally:
        _tear_down(chain, policy, operator)


def _tear_down(chain: Chain, policy: str, operator: OperatorProcess) -> None:
    """Remove the chain whatever state a failure left it in. Every step runs even when one
    before it failed, and the suite's operator runs again at the end: a leaked release would
    leave two operators fighting over every object and a vLLM engine eating the node's CPU for
    the rest of the suite. A step that failed fails the teardown, once all have run."""
    cluster, tenant = chain.cluster, chain.namespace
    problems: list[str] = []

    def step(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as error:  # every step runs; the failures are reported below
            problems.append(f"{what}: {type(error).__name__}: {error}")

    step("report", lambda: REPORT.write_text(json.dumps(chain.seconds, indent=2) + "\n"))
    step("operator logs", lambda: _keep_operator_logs(cluster, chain.release_namespace))
    # The release's operator finalizes the deployments: they go before it does.
    step(
        "deployments",
        lambda: cluster.run(
            "delete", "md", "--all", "-n", tenant, "--wait=true", "--timeout=300s", timeout=330
        ),
    )
    # While the release's operator runs: it removes kopf's finalizer from the Tenant (its resync
    # timer), and with the Tenant goes its namespace, then the volume's claim.
    step(
        "tenant",
        lambda: cluster.run(
            "delete", "tenant", tenant, "--wait=true", "--timeout=120s", timeout=150
        ),
    )
    step("helm uninstall", lambda: _uninstall(chain))
    # Whatever the operator did not get to: KubeRay removes the Ray pods with their objects.
    step(
        "ray objects",
        lambda: cluster.run(
            "delete",
            "rayservices,rayclusters",
            "--all",
            "-n",
            tenant,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=180s",
            timeout=210,
        ),
    )
    step("serving pods", lambda: _no_pods_left(cluster, tenant))
    step(
        "tenant gone",
        lambda: cluster.run("delete", "tenant", tenant, "--ignore-not-found", "--wait=false"),
    )
    step("volume", lambda: cluster.run("delete", "pv", f"{tenant}-models", "--ignore-not-found"))
    step("policy", lambda: cluster.run("delete", "residencypolicy", policy, "--ignore-not-found"))
    step(
        "release namespace",
        lambda: cluster.run(
            "delete", "namespace", chain.release_namespace, "--wait=false", "--ignore-not-found"
        ),
    )
    step(
        "peering",
        lambda: cluster.run(
            "delete", "clusterkopfpeering", f"{chain.release}-tramontane", "--ignore-not-found"
        ),
    )
    step(
        "admission policies",
        lambda: cluster.run(
            "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "policies/admission")
        ),
    )
    step("suite operator", operator.start)
    assert not problems, "the full chain's teardown left something behind:\n" + "\n".join(problems)


def _uninstall(chain: Chain) -> None:
    """helm uninstall until the release is gone (a loaded API server fails a call now and then)."""
    last = ""
    for _ in range(3):
        result = helm("uninstall", chain.release, "-n", chain.release_namespace, "--wait",
                      "--ignore-not-found", "--timeout", "180s",
                      kubeconfig=chain.cluster.kubeconfig, check=False)  # fmt: skip
        gone = helm("status", chain.release, "-n", chain.release_namespace,
                    kubeconfig=chain.cluster.kubeconfig, check=False)  # fmt: skip
        if gone.returncode != 0 and "not found" in gone.stderr:
            return
        last = result.stderr
        time.sleep(10)
    raise AssertionError(f"release {chain.release} still installed: {last}")


def _no_pods_left(cluster: Kubectl, namespace: str) -> None:
    """No pod left in the tenant's namespace; one stuck terminating is removed by force."""

    def none() -> bool:
        return not cluster.json("get", "pods", "-n", namespace)["items"]

    try:
        eventually(none, 180, f"the pods of {namespace} to be gone", interval=5)
    except AssertionError:
        cluster.run("delete", "pods", "--all", "-n", namespace, "--force", "--grace-period=0")
        eventually(none, 60, f"the pods of {namespace} to be gone after a forced delete")


def _keep_operator_logs(cluster: Kubectl, namespace: str) -> None:
    """The operator pods' logs outlive the release, in .cluster/logs/, for a failure's sake."""
    pods = cluster.json("get", "pods", "-n", namespace)["items"]
    for pod in pods:
        name = pod["metadata"]["name"]
        log = cluster.run("logs", name, "-n", namespace, "--all-containers", check=False)
        (localcluster.STATE / "logs" / f"full-chain-{name}.log").write_text(log)


def _answers(chain: Chain) -> bool:
    try:
        return bool(chain.client().models.list().data)
    except (openai.APIConnectionError, openai.APIStatusError):
        return False


def test_the_operator_runs_as_a_pod_and_serves_the_webhook_through_its_service(
    chain: Chain,
) -> None:
    cluster = chain.cluster
    pods = cluster.json(
        "get", "pods", "-n", chain.release_namespace, "-l", "app.kubernetes.io/component=operator"
    )["items"]
    assert len(pods) == 2
    for pod in pods:
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

    def pods_ready() -> list[dict[str, Any]] | None:
        pods: list[dict[str, Any]] = cluster.json(
            "get",
            "pods",
            "-n",
            chain.namespace,
            "-l",
            f"tramontane.dev/model-deployment={chain.deployment}",
        )["items"]
        for pod in pods:
            ready = [c for c in pod["status"].get("conditions", []) if c["type"] == "Ready"]
            if not ready or ready[0]["status"] != "True":
                return None
        return pods

    # The first answer comes through the head's HAProxy; a worker's own readiness (KubeRay's
    # probe: its raylet, then its HAProxy's /-/healthz once that has the routes) may follow a
    # few probe periods later on a busy node.
    pods = eventually(pods_ready, timeout=180, what="the Ray pods to be Ready", interval=2)
    kinds = sorted(p["metadata"]["labels"]["ray.io/node-type"] for p in pods)
    assert kinds == ["head", "worker"]
    for pod in pods:
        assert pod["spec"]["nodeName"] == realnode.NODE_NAME
        assert pod["status"]["phase"] == "Running"
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
    _check_answers(chain)


def _check_answers(chain: Chain) -> None:
    """Models, chat, streamed chat with usage, an adapter by name, 401 and 404, as a user sees
    them through the Service, with the exact text the test model is built to say."""
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
    # Sampled, as clients ask by default (temperature 1): the engine must survive it.
    sampled = client.completions.create(
        model=SERVED_NAME, prompt="Bonjour", max_tokens=8, temperature=1.0, top_p=0.9
    )
    assert sampled.usage is not None and sampled.usage.completion_tokens == 8
    assert client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        chain.client(key="sk-not-a-key").models.list()
    assert httpx.get(f"{chain.endpoint()}/models", timeout=30).status_code == 401
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model",
            messages=messages,
            max_tokens=2,
        )


class Load:
    """Clients calling the endpoint through its Service in a loop, as users do. No retries: a
    request that does not come back 200 with all its tokens is a failure."""

    def __init__(self, chain: Chain, streams: int, max_tokens: int) -> None:
        self.chain = chain
        self.max_tokens = max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(streams)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _run(self) -> None:
        url = f"{self.chain.endpoint()}/completions"
        request = {"model": SERVED_NAME, "prompt": "Bonjour", "max_tokens": self.max_tokens,
                   "temperature": 0}  # fmt: skip
        with httpx.Client(timeout=180) as client:
            while not self._stop.is_set():
                error: str | None = None
                try:
                    response = client.post(
                        url, json=request, headers={"Authorization": f"Bearer {self.chain.key}"}
                    )
                    if response.status_code != 200:
                        error = f"HTTP {response.status_code}: {response.text[:300]}"
                    elif response.json()["usage"]["completion_tokens"] != self.max_tokens:
                        error = f"short answer: {response.text[:300]}"
                except (httpx.HTTPError, ValueError, KeyError) as failure:
                    error = f"{type(failure).__name__}: {failure}"
                with self._lock:
                    if error:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {error}")
                    else:
                        self.ok += 1

    def report(self, chain: Chain, step: str) -> None:
        chain.seconds[f"{step}: requests ok"] = self.ok
        chain.seconds[f"{step}: requests failed"] = len(self.failures)
        print(f"[full chain] {step}: {self.ok} requests ok, {len(self.failures)} failed")


def _status_code(chain: Chain, key: str) -> int:
    try:
        headers = {"Authorization": f"Bearer {key}"}
        return int(httpx.get(f"{chain.endpoint()}/models", headers=headers, timeout=30).status_code)
    except httpx.HTTPError:
        return 0


def _serving_pods(chain: Chain, node_type: str | None = None) -> list[dict[str, Any]]:
    selector = f"tramontane.dev/model-deployment={chain.deployment}"
    if node_type:
        selector += f",ray.io/node-type={node_type}"
    pods: list[dict[str, Any]] = chain.cluster.json(
        "get", "pods", "-n", chain.namespace, "-l", selector
    )["items"]
    return pods


def _restarts(chain: Chain) -> dict[str, int]:
    return {
        pod["metadata"]["name"]: sum(
            c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", [])
        )
        for pod in _serving_pods(chain)
    }


def _md(chain: Chain, name: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = chain.cluster.json(
        "get", "md", name or chain.deployment, "-n", chain.namespace
    )
    return md


def _condition(md: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in md.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_a_key_added_to_the_secret_works_and_a_removed_one_is_refused_without_a_restart(
    chain: Chain,
) -> None:
    cluster, namespace = chain.cluster, chain.namespace
    pods_before = _restarts(chain)
    rotated = f"sk-rotated-{uuid.uuid4().hex}"
    started = time.monotonic()
    cluster.run("patch", "secret", "tiny-api-keys", "-n", namespace, "--type=merge", "-p",
                json.dumps({"stringData": {"rotated": rotated}}))  # fmt: skip
    eventually(lambda: _status_code(chain, rotated) == 200, 240, "the added key to be accepted")
    _timed(chain, "key added to the Secret → accepted", started)
    assert _status_code(chain, chain.key) == 200
    started = time.monotonic()
    cluster.run("patch", "secret", "tiny-api-keys", "-n", namespace, "--type=json", "-p",
                json.dumps([{"op": "remove", "path": "/data/e2e-client"}]))  # fmt: skip
    eventually(lambda: _status_code(chain, chain.key) == 401, 240, "the removed key refused")
    _timed(chain, "key removed from the Secret → refused", started)
    chain.key = rotated
    assert _status_code(chain, rotated) == 200
    assert _restarts(chain) == pods_before  # the same pods, none restarted


def test_a_crash_looping_pod_shows_in_the_conditions_with_its_containers_reason(
    chain: Chain,
) -> None:
    """A head too small for Ray is OOM-killed in a loop: a pod that will not fix itself."""
    cluster, namespace = chain.cluster, chain.namespace
    broken = _modeldeployment(namespace, chain.model_dir)
    broken["metadata"]["name"] = "broken"
    broken["spec"]["resources"] = {
        "head": {"cpu": "250m", "memory": "200Mi"},
        "worker": {"cpu": "100m", "memory": "512Mi"},
    }
    started = time.monotonic()
    cluster.create(broken)
    try:

        def crash_looping() -> dict[str, Any] | None:
            md = _md(chain, "broken")
            healthy = _condition(md, "PodsHealthy")
            return md if healthy.get("reason") == "CrashLoopBackOff" else None

        md = eventually(crash_looping, 300, "PodsHealthy=False with CrashLoopBackOff", interval=2)
        _timed(chain, "crash loop → reported in the conditions", started)
        healthy = _condition(md, "PodsHealthy")
        assert healthy["status"] == "False"
        assert "ray-head" in healthy["message"] and "restarts" in healthy["message"], healthy
        ready = _condition(md, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "CrashLoopBackOff"), ready
        events = cluster.json("get", "events.events.k8s.io", "-n", namespace,
                              "--field-selector", "regarding.name=broken")["items"]  # fmt: skip
        assert any(e["reason"] == "PodsFailing" and e["type"] == "Warning" for e in events)
    finally:
        cluster.run("delete", "md", "broken", "-n", namespace, "--wait=true", "--timeout=120s")
    # The healthy deployment was not disturbed.
    assert _status_code(chain, chain.key) == 200


def _operator_pods(chain: Chain) -> list[str]:
    pods = chain.cluster.json(
        "get", "pods", "-n", chain.release_namespace, "-l", "app.kubernetes.io/component=operator"
    )["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_the_standby_operator_takes_over_when_the_active_pod_is_deleted_under_load(
    chain: Chain,
) -> None:
    cluster = chain.cluster
    peering = f"{chain.release}-tramontane"
    peers = cluster.json("get", "clusterkopfpeering", peering).get("status", {})
    active = max(peers, key=lambda peer: int(peers[peer]["priority"]))
    assert active in _operator_pods(chain) and len(peers) == 2, peers
    with Load(chain, streams=2, max_tokens=16) as load:
        time.sleep(5)
        started = time.monotonic()
        cluster.run("delete", "pod", active, "-n", chain.release_namespace, "--wait=true",
                    "--timeout=120s")  # fmt: skip
        _timed(chain, "active operator pod deleted → gone", started)
        # With the active replica gone, only the standby can restore a deleted child.
        started = time.monotonic()
        cluster.run("delete", "podmonitor", chain.deployment, "-n", chain.namespace)
        eventually(
            lambda: cluster.run("get", "podmonitor", chain.deployment, "-n", chain.namespace,
                                "--ignore-not-found").strip(),
            180, "the standby replica to restore the deleted PodMonitor",
        )  # fmt: skip
        _timed(chain, "standby took over: deleted child restored", started)
        # Admission is served by the remaining pod through the webhook Service.
        outside = _modeldeployment(chain.namespace, chain.model_dir)
        outside["metadata"]["name"] = "outside"
        outside["spec"]["model"]["uri"] = "s3://somewhere-else/llama"
        outside["spec"]["adapters"] = []
        refused = cluster.create(outside, check=False)
        assert 'admission webhook "modeldeployment.tramontane.dev" denied' in refused.stderr
        time.sleep(3)
    load.report(chain, "operator failover")
    assert load.ok > 0
    assert not load.failures, load.failures[:5]
    peers = cluster.json("get", "clusterkopfpeering", peering).get("status", {})
    assert active not in peers


def _llm_replicas(chain: Chain) -> list[dict[str, Any]]:
    """The engine replicas of the Serve application, as the Ray dashboard lists them (on the
    head pod: KubeRay's head Service is headless)."""
    cluster_name = _md(chain)["status"]["rayClusterName"]
    (head,) = chain.cluster.json(
        "get", "pods", "-n", chain.namespace, "-l",
        f"ray.io/cluster={cluster_name},ray.io/node-type=head",
    )["items"]  # fmt: skip
    url = f"http://{head['status']['podIP']}:8265/api/serve/applications/"
    applications = httpx.get(url, timeout=30).json()["applications"]
    deployments = applications[chain.deployment]["deployments"]
    return [
        replica
        for name, deployment in deployments.items()
        if name == engine_deployment_name(SERVED_NAME)
        for replica in deployment.get("replicas", [])
    ]


def _running_replicas(chain: Chain) -> int:
    return sum(1 for r in _llm_replicas(chain) if r.get("state") == "RUNNING")


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _requests_served_by(pod: dict[str, Any]) -> float:
    """Requests the engine replica in this pod handled, from its Ray metrics endpoint (Serve's
    per-deployment request counter, or vLLM's finished requests)."""
    try:
        text = httpx.get(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        engine = "LLMServer" in line and "serve_deployment_request_counter" in line
        if engine or ("vllm" in line and "request_success" in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _serve_metric_lines(pod: dict[str, Any]) -> list[str]:
    try:
        text = httpx.get(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10).text
    except httpx.HTTPError as error:
        return [str(error)]
    return [line[:200] for line in text.splitlines() if "request" in line and "serve" in line]


def _set_max_replicas(chain: Chain, maximum: int) -> None:
    patch = json.dumps({"spec": {"scaling": {"maxReplicas": maximum}}})
    chain.cluster.run(
        "patch", "md", chain.deployment, "-n", chain.namespace, "--type=merge", "-p", patch
    )

    def applied() -> bool:
        rayservice = chain.cluster.json("get", "rayservice", chain.deployment, "-n",
                                        chain.namespace)  # fmt: skip
        group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        return bool(group["maxReplicas"] == maximum)

    eventually(applied, 60, f"the RayService to allow {maximum} workers")


def _tolerant(probe: Callable[[], T]) -> Callable[[], T | None]:
    """`probe`, or None while the API server or the dashboard does not answer: on the 2-core node
    a scale-out starves the control plane for seconds (TLS handshake timeouts), which is not
    what this test is about; the waits around it are long enough to ride it out."""

    def tolerant() -> T | None:
        try:
            return probe()
        except (KubectlError, httpx.HTTPError, KeyError, ValueError):
            return None

    return tolerant


# Above the sum of its waits: a slow step fails with its own message, not pytest-timeout's.
@pytest.mark.timeout(2700)
def test_under_load_serve_adds_a_replica_on_a_new_worker_pod_and_removes_both_after(
    chain: Chain,
) -> None:
    serving_cluster = _md(chain)["status"]["rayClusterName"]
    _set_max_replicas(chain, 2)
    workers = _tolerant(lambda: _serving_pods(chain, "worker"))
    replicas = _tolerant(lambda: _running_replicas(chain))

    def both_ready() -> bool:
        pods = workers()
        return pods is not None and len(pods) == 2 and all(_ready(p) for p in pods)

    try:
        (first,) = _serving_pods(chain, "worker")
        # Two streams: with targetOngoingRequests 1 Serve wants a second replica, and the node
        # keeps some CPU for its control plane.
        with Load(chain, streams=2, max_tokens=48) as load:
            started = time.monotonic()
            eventually(lambda: len(workers() or []) == 2, 300,
                       "the Ray autoscaler to create a second worker pod", interval=2)  # fmt: skip
            _timed(chain, "autoscale up: load → worker pod created", started)
            eventually(both_ready, 300, "the new worker pod Ready", interval=3)
            _timed(chain, "autoscale up: load → worker pod Ready", started)
            eventually(lambda: replicas() == 2, 600, "the second engine replica RUNNING",
                       interval=5)  # fmt: skip
            _timed(chain, "autoscale up: load → second replica RUNNING", started)
            pods = eventually(workers, 120, "the worker pods", interval=3)
            (new,) = [p for p in pods if p["metadata"]["name"] != first["metadata"]["name"]]
            try:
                eventually(lambda: _requests_served_by(new) > 0, 180,
                           "the new replica to serve requests", interval=3)  # fmt: skip
            except AssertionError as timeout:
                raise AssertionError(
                    f"{timeout}; replicas: {_tolerant(lambda: _llm_replicas(chain))()}; load: "
                    f"{load.ok} ok, failures: {load.failures[:3]}; metrics of "
                    f"{new['metadata']['name']}: {_serve_metric_lines(new)}"
                ) from None
            _timed(chain, "autoscale up: load → new replica served", started)
        load.report(chain, "autoscale up")
        assert load.ok > 0
        assert not load.failures, load.failures[:5]
        started = time.monotonic()
        eventually(lambda: replicas() == 1, 300, "Serve to remove the replica",
                   interval=5)  # fmt: skip
        _timed(chain, "autoscale down: load stopped → replica removed", started)
        eventually(lambda: workers() is not None and len(workers() or []) == 1, 300,
                   "the autoscaler to remove the idle worker pod", interval=5)  # fmt: skip
        _timed(chain, "autoscale down: load stopped → worker pod removed", started)
        # Scaling is applied in place: the same cluster served throughout.
        assert _md(chain)["status"]["rayClusterName"] == serving_cluster
        assert _status_code(chain, chain.key) == 200
    finally:
        _set_max_replicas(chain, 1)


def test_an_engine_change_under_load_moves_to_a_new_cluster_without_a_failed_request(
    chain: Chain,
) -> None:
    cluster, namespace = chain.cluster, chain.namespace
    old = _md(chain)["status"]["rayClusterName"]
    overlap: list[dict[str, str]] = []
    with Load(chain, streams=1, max_tokens=16) as load:
        started = time.monotonic()
        cluster.run("patch", "md", chain.deployment, "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"engine": {"maxModelLen": 1024}}}))  # fmt: skip

        def upgrading() -> dict[str, Any] | None:
            condition = _condition(_md(chain), "Upgrading")
            return condition if condition.get("reason") == "NewClusterStarting" else None

        condition = eventually(upgrading, 120, "Upgrading=True NewClusterStarting")
        assert old in condition["message"]
        _timed(chain, "engine change → Upgrading (new cluster starting)", started)

        def switched() -> str | None:
            quota = cluster.json("get", "resourcequota", "tramontane-tenant", "-n", namespace)
            clusters = {p["metadata"]["labels"]["ray.io/cluster"] for p in _serving_pods(chain)}
            if len(clusters) == 2:
                overlap.append(
                    quota["status"]["used"] | {"hard.pods": quota["spec"]["hard"]["pods"]}
                )
            name = _md(chain)["status"].get("rayClusterName")
            return name if name != old else None

        new = eventually(switched, 900, "the Service to move to the new cluster", interval=2)
        _timed(chain, "engine change → new cluster serving", started)
        eventually(lambda: not cluster.run("get", "raycluster", old, "-n", namespace,
                                           "--ignore-not-found").strip(),
                   300, "KubeRay to delete the old cluster", interval=2)  # fmt: skip
        _timed(chain, "engine change → old cluster deleted", started)
    load.report(chain, "zero-downtime upgrade")
    assert load.ok > 0
    assert not load.failures, load.failures[:5]
    # Both clusters ran side by side within the namespace's quota.
    assert overlap, "never saw the two clusters side by side"
    assert all(int(used["pods"]) <= int(used["hard.pods"]) for used in overlap)
    md = _md(chain)
    assert md["status"]["rayClusterName"] == new
    assert _condition(md, "Upgrading")["reason"] == "UpToDate"
    assert _condition(md, "Ready")["status"] == "True"
    rayservice = cluster.json("get", "rayservice", chain.deployment, "-n", namespace)
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["engine"]["maxModelLen"] == 1024
    events = cluster.json("get", "events.events.k8s.io", "-n", namespace, "--field-selector",
                          f"regarding.name={chain.deployment}")["items"]  # fmt: skip
    changed = [e for e in events if e["reason"] == "ServingClusterChanged"]
    assert changed and new in changed[-1]["note"] and old in changed[-1]["note"]
    # The new engine answers exactly as the old one did.
    _check_answers(chain)
