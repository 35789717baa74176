"""The real chain on the local cluster's real node, as a user goes: what `make demo` runs and what
the full-chain test (tests/integration/test_full_chain.py) checks.

`helm install` of the chart with the images `make images` built, on the real node; a
ResidencyPolicy for the node's region and a Tenant; the tiny test model on a PersistentVolume and
the tenant's claim; an API key; a ModelDeployment on CPU. Run as a program (`make demo`), it
installs all that, waits for the endpoint to answer through its Kubernetes Service and prints how
long each step took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import localcluster
import realnode

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "tramontane"
ADAPTER = "finance-reports"
SERVED_NAME = "tiny-llama"
DEPLOYMENT = "tiny"


def helm_binary() -> Path:
    return localcluster.artifact_dirs()["helm"] / "helm"


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # Helm's own state (repositories, plugins) stays out of the user's home.
    home = localcluster.CACHE / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run(
        [str(helm_binary()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def chart_values() -> list[str]:
    """The chart's values for the real node: our images, pods on the node, small Ray pods."""
    on_node = f"operator.nodeSelector.kubernetes\\.io/hostname={realnode.NODE_NAME}"
    toleration = json.dumps([realnode.NODE_TOLERATION])
    return [
        "--set", "operator.image.repository=docker.io/tramontane/operator",
        "--set", "operator.image.tag=dev",
        "--set", "operator.image.pullPolicy=Never",
        # Two replicas: one works, the other takes over when it goes.
        "--set", "operator.replicas=2",
        "--set", "operator.resources.requests.cpu=50m",
        "--set", on_node,
        "--set-json", f"operator.tolerations={toleration}",
        "--set", "serving.image=docker.io/tramontane/serving:dev",
        # The local cluster's KubeRay runs as this user (its client certificate), not as a
        # ServiceAccount: the guard policies let it write Ray objects.
        "--set", f"kuberay.identities={{{localcluster.KUBERAY_USER}}}",
        "--set-json", f"serving.tolerations={toleration}",
        # Two cores for everything, at the busiest moment (an upgrade: two clusters of a head,
        # its autoscaler and one engine worker): 2 x 50m + 2 x (250m + 100m + 600m) = 2000m.
        "--set", "serving.resources.head.cpu=250m",
        "--set", "serving.resources.head.memory=2560Mi",
        "--set", "serving.resources.cpuWorker.cpu=600m",
        "--set", "serving.resources.cpuWorker.memory=5Gi",
        "--set", "serving.resources.autoscaler.cpu=100m",
        "--set", "serving.resources.autoscaler.memory=256Mi",
    ]  # fmt: skip


def residency_policy(name: str) -> dict[str, Any]:
    """Weights from the tenant's volumes only, pods only in the real node's region."""
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "ResidencyPolicy",
        "metadata": {"name": name},
        "spec": {
            "jurisdiction": "EU",
            "regions": [realnode.NODE_REGION],
            "modelSources": ["pvc://**"],
        },
    }


def model_volume(namespace: str, model_dir: Path) -> list[dict[str, Any]]:
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


def modeldeployment(namespace: str, model_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """The tiny model and one adapter on CPU, one replica (scaling targets one request each)."""
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": DEPLOYMENT, "namespace": namespace},
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
            "scaling": {
                "minReplicas": 1,
                "maxReplicas": 1,
                "targetOngoingRequests": 1,
                "upscaleDelaySeconds": 2,
                "downscaleDelaySeconds": 15,
            },
        },
    }


# `make demo` ---------------------------------------------------------------------------------

DEMO_RELEASE = "tramontane"
DEMO_RELEASE_NAMESPACE = "tramontane-system"
DEMO_TENANT = "team-local"
DEMO_POLICY = "eu-local"
DEMO_KEY_NAME = "demo-client"


def _kubectl(*args: str, stdin: str | None = None) -> str:
    command = ["kubectl", "--kubeconfig", str(localcluster.kubeconfig_path()), *args]
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def _apply(*manifests: dict[str, Any]) -> None:
    stdin = "\n".join(json.dumps(m) for m in manifests)
    print(_kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=stdin), end="")


class _Steps:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        print(f"\n\033[1m== {what}\033[0m", flush=True)
        started = time.monotonic()
        yield
        self.seconds[what] = round(time.monotonic() - started, 1)
        print(f"   ({self.seconds[what]} s)", flush=True)


def _wait(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _endpoint() -> str:
    service = json.loads(
        _kubectl("get", "service", f"{DEPLOYMENT}-serve-svc", "-n", DEMO_TENANT, "-o", "json")
    )
    return f"http://{service['spec']['clusterIP']}:8000/v1"


def _api_key() -> str:
    existing = _kubectl("get", "secret", f"{DEPLOYMENT}-api-keys", "-n", DEMO_TENANT,
                        "--ignore-not-found", "-o", "json").strip()  # fmt: skip
    if existing:
        import base64  # noqa: PLC0415

        return base64.b64decode(json.loads(existing)["data"][DEMO_KEY_NAME]).decode()
    key = f"sk-demo-{os.urandom(16).hex()}"
    _kubectl("create", "secret", "generic", f"{DEPLOYMENT}-api-keys", "-n", DEMO_TENANT,
             f"--from-literal={DEMO_KEY_NAME}={key}")  # fmt: skip
    return key


def _curl(url: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    command = ["curl", "-sS", "-m", "60", "-o", "-", "-w", "\n%{http_code}",
               "-H", f"Authorization: Bearer {key}", url]  # fmt: skip
    if body is not None:
        command += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    text, _, code = result.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), text


def _demo_tenant() -> dict[str, Any]:
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": DEMO_TENANT},
        "spec": {
            "namespace": DEMO_TENANT,
            "residencyPolicy": DEMO_POLICY,
            "quota": {"gpus": 0, "modelDeployments": 2},
            "admins": {"groups": [f"{DEMO_TENANT}-admins"]},
        },
    }


def _adopt_leftovers() -> None:
    """The admission objects the chart owns, if something else made them (the test suite, or
    the simulated-fleet demo applies them without the chart): Helm refuses to take them over."""
    for kind, name in [
        ("validatingwebhookconfiguration", "tramontane.dev"),
        ("validatingadmissionpolicy", "tramontane-residency-pod"),
        ("validatingadmissionpolicy", "tramontane-residency-raycluster"),
        ("validatingadmissionpolicy", "tramontane-residency-rayservice"),
        *(
            (kind, f"tramontane-guard-{name}")
            for kind in ("validatingadmissionpolicy", "validatingadmissionpolicybinding")
            for name in ("namespace-labels", "service-account-tokens", "raycluster", "rayservice")
        ),
    ]:
        found = _kubectl("get", kind, name, "--ignore-not-found", "-o", "json").strip()
        labels = json.loads(found)["metadata"].get("labels", {}) if found else {}
        if found and labels.get("app.kubernetes.io/managed-by") != "Helm":
            _kubectl("delete", kind, name)


def demo() -> None:
    import testmodel  # noqa: PLC0415 (torch: serving venv only)

    steps = _Steps()
    kubeconfig = localcluster.kubeconfig_path()
    _adopt_leftovers()
    with steps.step(f"helm install {DEMO_RELEASE} (the operator runs as pods on the real node)"):
        helm("upgrade", "--install", DEMO_RELEASE, str(CHART), "--namespace",
             DEMO_RELEASE_NAMESPACE, "--create-namespace", "--wait", "--timeout", "300s",
             *chart_values(), kubeconfig=kubeconfig)  # fmt: skip
        print(_kubectl("get", "pods", "-n", DEMO_RELEASE_NAMESPACE, "-o", "wide"), end="")
    with steps.step("helm test (the webhook answers through its Service)"):
        print(helm("test", DEMO_RELEASE, "-n", DEMO_RELEASE_NAMESPACE, "--timeout", "180s",
                   kubeconfig=kubeconfig).stdout.strip().splitlines()[-1])  # fmt: skip
    with steps.step(f"ResidencyPolicy {DEMO_POLICY} ({realnode.NODE_REGION}) and Tenant "
                    f"{DEMO_TENANT}"):  # fmt: skip
        _apply(residency_policy(DEMO_POLICY), _demo_tenant())
        _kubectl("wait", f"tenant/{DEMO_TENANT}", "--for=condition=Ready", "--timeout=120s")
    with steps.step("The tiny test model on a PersistentVolume, the tenant's claim, an API key"):
        model_dir = testmodel.ensure_model()
        adapter_dir = testmodel.ensure_adapter(model_dir, ADAPTER)
        _apply(*model_volume(DEMO_TENANT, model_dir))
        key = _api_key()
    with steps.step(f"kubectl apply of ModelDeployment {DEPLOYMENT} (CPU) → Ready"):
        _apply(modeldeployment(DEMO_TENANT, model_dir, adapter_dir))
        _kubectl("wait", "-n", DEMO_TENANT, f"md/{DEPLOYMENT}", "--for=condition=Ready",
                 "--timeout=900s")  # fmt: skip
        print(_kubectl("get", "md,rayservice,raycluster,pods", "-n", DEMO_TENANT), end="")
    with steps.step("First answer through the Kubernetes Service (ClusterIP, kube-proxy)"):
        endpoint = _endpoint()
        _wait(lambda: _curl(f"{endpoint}/models", key)[0] == 200, 300, "the endpoint")
        code, text = _curl(
            f"{endpoint}/chat/completions",
            key,
            {"model": SERVED_NAME, "max_tokens": 16, "temperature": 0,
             "messages": [{"role": "user", "content": "Bonjour"}]},
        )  # fmt: skip
        if code != 200:
            raise SystemExit(f"chat completion failed: HTTP {code}: {text}")
        print(f"POST {endpoint}/chat/completions → {json.loads(text)['choices'][0]['message']}")
        code, _ = _curl(f"{endpoint}/models", "sk-not-a-key")
        print(f"GET {endpoint}/models with a wrong key → HTTP {code}")
    print("\n\033[1m== Times\033[0m")
    for what, seconds in steps.seconds.items():
        print(f"{seconds:8.1f} s  {what}")
    print(
        f"\nTry it: e2e/netns.sh exec curl -H 'Authorization: Bearer {key}' {endpoint}/models\n"
        f"        e2e/netns.sh exec kubectl --kubeconfig {localcluster.kubeconfig_path()} "
        f"get md -n {DEMO_TENANT} -o wide\n"
        "Remove the demo (the cluster keeps running): make demo-down; stop everything: "
        "make cluster-down"
    )


def demo_down() -> None:
    """Remove what `make demo` installed; the cluster keeps running."""
    _kubectl("delete", "md", "--all", "-n", DEMO_TENANT, "--ignore-not-found", "--wait=true",
             "--timeout=180s")  # fmt: skip
    # Waited for while the release's operator runs: it removes kopf's finalizer from the Tenant
    # (its resync timer), and nothing would once the release is gone.
    _kubectl("delete", "tenant", DEMO_TENANT, "--ignore-not-found", "--wait=true",
             "--timeout=120s")  # fmt: skip
    _kubectl("delete", "pv", f"{DEMO_TENANT}-models", "--ignore-not-found", "--wait=false")
    _kubectl("delete", "residencypolicy", DEMO_POLICY, "--ignore-not-found")
    helm("uninstall", DEMO_RELEASE, "-n", DEMO_RELEASE_NAMESPACE, "--wait", "--ignore-not-found",
         kubeconfig=localcluster.kubeconfig_path())  # fmt: skip
    _kubectl("delete", "namespace", DEMO_RELEASE_NAMESPACE, "--ignore-not-found", "--timeout=180s")
    _kubectl("delete", "clusterkopfpeering", f"{DEMO_RELEASE}-tramontane", "--ignore-not-found")
    print("demo removed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=["up", "down"], default="up")
    if parser.parse_args(argv).action == "down":
        demo_down()
    else:
        demo()


if __name__ == "__main__":
    main()
