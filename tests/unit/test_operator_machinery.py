"""The operator's own machinery around kopf: API retries, the webhook's view of peering, and the
facts handlers read from kopf's indexes. Pure rules; their behaviour against the real API server
is in tests/integration/test_faults.py."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.controller import kube, peering
from tramontane.controller.indexes import Facts, deployment_facts, regions_by_accelerator
from tramontane.render.tenant import TenancyError


def _throttled(retry_after: str) -> ApiException:
    error = ApiException(status=429, reason="Too Many Requests")
    error.headers = {"Retry-After": retry_after}
    return error


def test_a_429_waits_at_least_what_the_api_server_asks() -> None:
    assert kube._backoff(0, _throttled("3")) >= 3.0
    assert kube._backoff(0, _throttled("3600")) <= 30.0  # bounded: a reconcile must not hang
    assert kube._backoff(0, _throttled("soon")) < 1.0


def test_broken_connections_are_retried_and_a_refusal_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tramontane.controller.kube.time.sleep", lambda _: None)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise urllib3.exceptions.ProtocolError("connection reset")
        return "answer"

    assert kube.with_retries(flaky) == "answer" and len(calls) == 3

    def forbidden() -> str:
        calls.append(1)
        raise ApiException(status=403, reason="Forbidden")

    calls.clear()
    with pytest.raises(ApiException):
        kube.with_retries(forbidden)
    assert len(calls) == 1

    def down() -> str:
        calls.append(1)
        raise urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]

    calls.clear()
    with pytest.raises(urllib3.exceptions.HTTPError):
        kube.with_retries(down)
    assert len(calls) == kube.ATTEMPTS


class _PeeringRecord:
    """The ClusterKopfPeering object as the API would return it (a stand-in for the API)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.reads = 0

    def get(self, *_: Any) -> dict[str, Any]:
        self.reads += 1
        return {"status": self.status}


def _peer(priority: int) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)
    return {"priority": priority, "lifetime": 60, "lastseen": now.isoformat()}


def test_the_webhook_trusts_its_indexes_only_as_the_settled_active_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = _PeeringRecord()
    clock = [1000.0]
    monkeypatch.setattr("tramontane.controller.peering.time.monotonic", lambda: clock[0])
    standing = peering.Standing("peers", lambda: record)  # type: ignore[arg-type,return-value]
    record.status = {"older": _peer(standing.priority + 1)}
    assert not standing.trusts_indexes()  # a standby: kopf paused its watches
    clock[0] += 1
    assert not standing.trusts_indexes() and record.reads == 1  # cached for CACHE_S
    record.status = {}  # the older replica is gone
    clock[0] += peering.CACHE_S
    assert not standing.trusts_indexes()  # active, but kopf is still listing again
    clock[0] += peering.SETTLE_S
    assert standing.trusts_indexes()
    assert peering.Standing(None, lambda: record).trusts_indexes()  # type: ignore[arg-type,return-value]


def _tenant(name: str, namespace: str, policy: str) -> Tenant:
    return Tenant.model_validate(
        {
            "metadata": {"name": name, "uid": f"uid-{name}"},
            "spec": {
                "namespace": namespace,
                "residencyPolicy": policy,
                "quota": {"gpus": 8, "modelDeployments": 4},
                "admins": {"groups": ["admins"]},
            },
        }
    )


def _policy(name: str) -> ResidencyPolicy:
    return ResidencyPolicy.model_validate(
        {
            "metadata": {"name": name},
            "spec": {"jurisdiction": "EU", "regions": ["eu-west-1"], "modelSources": ["s3://*"]},
        }
    )


def test_facts_fail_closed_like_the_api_reads_did() -> None:
    acme = _tenant("acme", "acme", "eu")
    labels = {"tramontane.dev/tenant": "acme", "tramontane.dev/residency-policy": "eu"}
    facts = Facts("acme", labels, (acme,), {"eu": _policy("eu")})
    assert facts.owner() is acme and facts.policy_of(acme) is not None
    with pytest.raises(TenancyError) as missing:
        Facts("acme", None, (acme,), {}).owner()
    assert missing.value.reason == "NoTenant"
    # Labels naming a tenant that does not claim the namespace, or another policy: held.
    for wrong in ({"tramontane.dev/tenant": "other"}, {"tramontane.dev/residency-policy": "us"}):
        with pytest.raises(TenancyError) as mismatch:
            Facts("acme", {**labels, **wrong}, (acme,), {}).owner()
        assert mismatch.value.reason == "TenancyMismatch"
    assert Facts("acme", labels, (acme,), {}).policy_of(acme) is None


def test_regions_per_accelerator_from_the_nodes() -> None:
    regions = regions_by_accelerator(
        [("NVIDIA-H100-80GB-HBM3", "eu-west-1"), ("", "eu-central-1"), ("NVIDIA-L40S", "us-east-1")]
    )
    assert regions["H100"] == {"eu-west-1"}
    assert regions["CPU"] == {"eu-west-1", "eu-central-1", "us-east-1"}


def test_a_deployment_the_models_refuse_still_counts_at_its_raw_fields() -> None:
    body = {
        "metadata": {"name": "legacy", "namespace": "acme"},
        "spec": {"scaling": {"maxReplicas": 3}, "accelerator": {"count": 2}, "model": {}},
    }
    facts = deployment_facts(body)
    assert facts.name == "legacy" and facts.gpus == 6 and not facts.reconciled
