from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kubectl, eventually, tenant_manifest
from tests.otelcol import Collector

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the local cluster: mark it as a group."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def crds(cluster: Kubectl, repo_root: Path) -> Kubectl:
    """Our CRDs (crds/) installed and established, and the residency admission policies."""
    # `make demo` installs the chart: its operator would reconcile the suite's objects too.
    if cluster.run("get", "namespace", "tramontane-system", "--ignore-not-found").strip():
        pytest.exit("`make demo` left its release in the cluster: run `make demo-down` first", 2)
    cluster.run("apply", "--server-side", "--force-conflicts", "-f", str(repo_root / "crds"))
    cluster.run(
        "apply", "--server-side", "--force-conflicts", "-f", str(repo_root / "policies/admission")
    )
    cluster.run(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/modeldeployments.tramontane.dev",
    )
    return cluster


SERVING_OTLP_ENDPOINT = "http://otel-collector.observability.svc:4318"


class OperatorProcess:
    """The real operator (`python -m tramontane.controller`) as a child process."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        otlp_endpoint: str,
        extra_environment: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.extra_environment = extra_environment or {}
        self.otlp_endpoint = otlp_endpoint
        self.log_path = log_path
        self.port = _free_port()
        self.webhook_port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TRAMONTANE_METRICS_PORT": str(self.port),
            "TRAMONTANE_METRICS_HOST": "127.0.0.1",
            "TRAMONTANE_WEBHOOK_PORT": str(self.webhook_port),
            "PYTHONPATH": str(HERE.parent.parent / "operator"),
            # Each process its own peering identity, as each pod has its name (never inherited
            # from this process).
            "POD_ID": f"operator-{self.port}",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            # Rendered into a tenant's serving pods only where its policy's telemetryEndpoints
            # list it (test_tenancy): nothing listens there, nothing here exports to it.
            "TRAMONTANE_SERVING_OTLP_ENDPOINT": SERVING_OTLP_ENDPOINT,
            **self.extra_environment,
        }

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tramontane.controller"],
                env=self.environment(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        eventually(lambda: _http_status(f"{self.url}/readyz") == 200, 60, "operator /readyz")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies or the OOM killer strikes."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (http://127.0.0.1)
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


@pytest.fixture(scope="session")
def operator(crds: Kubectl, otel_collector: Collector) -> Iterator[OperatorProcess]:
    log_dir = Path(os.environ.get("TRAMONTANE_CLUSTER_DIR", HERE.parent.parent / ".cluster"))
    log_path = log_dir / "logs" / "operator-tests.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = OperatorProcess(crds.kubeconfig, log_path, otel_collector.endpoint)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def tenant_namespace(operator: OperatorProcess, crds: Kubectl) -> Iterator[str]:
    """A fresh namespace of an unrestricted Tenant (ModelDeployments live only in tenants')."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    crds.run("apply", "-f", str(HERE.parent.parent / "policies/presets/unrestricted.yaml"))
    crds.apply(tenant_manifest(name, "unrestricted", gpus=512, deployments=100))
    crds.run("wait", f"tenant/{name}", "--for=condition=Ready", "--timeout=60s")
    yield name
    # Deployments first: the webhook refuses to delete a Tenant that still has some.
    crds.run("delete", "md", "--all", "-n", name, "--wait=true", check=False)
    crds.run("delete", "tenant", name, "--wait=false", check=False)
