"""Shared fixtures. Integration tests get a real local control plane through `cluster`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import localcluster
from tests import otelcol
from tests.kube import Kubectl


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
    return Path(__file__).resolve().parent.parent
