"""Shared fixtures. Integration tests get a real local control plane through `cluster`, our CRDs
through `crds` and the session's one operator through `operator` (the serving tests' metrics test
uses the same one)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import localcluster
from tests import otelcol
from tests.kube import Kubectl
from tests.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster() -> Iterator[Kubectl]:
    """The local cluster: reuses one that is up and healthy, else starts it and stops it after.

    Only what this session started is stopped, so a developer's running `make cluster` survives
    `make test`.
    """
    started_here = not localcluster.healthy()
    if started_here:
        localcluster.up()
    yield Kubectl(localcluster.kubeconfig_path())
    if started_here:
        localcluster.stop_all()


@pytest.fixture
def namespace(cluster: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for finalization)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.run("create", "namespace", name)
    yield name
    cluster.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def otel_collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[otelcol.Collector]:
    """A real OpenTelemetry Collector (built by `e2e/build.sh otelcol`) on free ports."""
    with otelcol.running(tmp_path_factory.mktemp("otelcol")) as collector:
        yield collector


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


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
        "crd/tenants.tramontane.dev",
    )
    return cluster


@pytest.fixture(scope="session")
def operator(crds: Kubectl, otel_collector: otelcol.Collector) -> Iterator[OperatorProcess]:
    """The session's one operator process, on the local cluster with our CRDs."""
    log_dir = Path(os.environ.get("TRAMONTANE_CLUSTER_DIR", REPO / ".cluster"))
    log_path = log_dir / "logs" / "operator-tests.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = OperatorProcess(crds.kubeconfig, log_path, otel_collector.endpoint)
    process.start()
    yield process
    process.stop()
