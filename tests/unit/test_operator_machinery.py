"""The operator's own machinery around kopf: API retries, the webhook's view of peering, and the
facts handlers read from kopf's indexes. Pure rules; their behaviour against the real API server
is in tests/integration/test_faults.py."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.controller import admission, kube, peering, reconcile
from tramontane.controller.indexes import (
    DeploymentFacts,
    Facts,
    deployment_facts,
    regions_by_accelerator,
)
from tramontane.controller.peering import Mode
from tramontane.controller.watch_cache import ChildCache
from tramontane.render.tenant import TenancyError

REPO = Path(__file__).resolve().parents[2]


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


def _peer(priority: int, seconds_ago: float = 0.0, lifetime: int = 30) -> dict[str, Any]:
    seen = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_only_the_settled_active_replica_decides_from_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = _PeeringRecord()
    clock = [1000.0]
    monkeypatch.setattr("tramontane.controller.peering.time.monotonic", lambda: clock[0])
    standing = peering.Standing("peers", lambda: record)  # type: ignore[arg-type,return-value]
    me = standing.identity
    record.status = {"older": _peer(standing.priority + 1), me: _peer(standing.priority)}
    assert standing.mode() is Mode.STANDBY  # a live older peer decides
    clock[0] += 1
    assert standing.cached_mode() is Mode.STANDBY and record.reads == 1  # cached for CACHE_S
    record.status = {me: _peer(standing.priority)}  # the older replica is gone
    clock[0] += peering.CACHE_S
    assert standing.cached_mode() is None  # the view expired: mode() reads again
    assert standing.mode() is Mode.API  # active, but kopf is still listing again
    clock[0] += peering.SETTLE_S
    assert standing.mode() is Mode.MEMORY
    assert peering.Standing(None, lambda: record).mode() is Mode.MEMORY  # type: ignore[arg-type,return-value]


def test_a_replica_whose_own_record_ages_stops_deciding_before_others_may_take_over() -> None:
    now = datetime.datetime.now(datetime.UTC)
    younger = {"younger": _peer(5)}

    def mode(seconds_ago: float) -> Mode:
        return peering.mode_of({**younger, "me": _peer(10, seconds_ago)}, "me", 10, now)

    assert mode(0) is Mode.MEMORY
    assert mode(25) is Mode.MEMORY  # kopf refreshes every lifetime - 5..10 s
    # Within CACHE_S + MARGIN_S of expiry (a slow keepalive): the others cannot take over yet,
    # but may before this view is read again; decided from the API, still alone.
    assert mode(27.5) is Mode.API
    assert mode(29.5) is Mode.STANDBY  # within MARGIN_S: others may see it expired
    assert mode(31) is Mode.STANDBY
    assert peering.mode_of(younger, "me", 10, now) is Mode.STANDBY  # not announced yet


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
    assert facts.name == "legacy" and facts.gpus == 6


def _review(name: str) -> admission.Review:
    body = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    return admission.Review({**body, "metadata": {"name": name, "namespace": "acme"}}, False)


def _facts(*deployments: DeploymentFacts) -> Facts:
    acme = _tenant("acme", "acme", "eu")  # 8 GPUs, 4 deployments; the sample takes 4 GPUs
    labels = {"tramontane.dev/tenant": "acme", "tramontane.dev/residency-policy": "eu"}
    policy = ResidencyPolicy.model_validate(
        {
            "metadata": {"name": "eu"},
            "spec": {"jurisdiction": "EU", "regions": ["eu-west-1"],
                     "modelSources": ["s3://acme-eu-models/**"]},
        }
    )  # fmt: skip
    return Facts("acme", labels, (acme,), {"eu": policy}, deployments,
                 {"H100": frozenset({"eu-west-1"})})  # fmt: skip


def test_quota_is_exact_from_memory_across_batches_until_the_indexes_catch_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission, "in_flight", admission.InFlight())
    monkeypatch.setattr(admission, "confirmations", admission.Confirmations())
    first = [_review(f"md-{i}") for i in range(20)]
    refused = admission.admit_from_memory("acme", first, _facts())
    assert [r.outcome is None for r in first].count(True) == 2  # 8 GPUs / 4 each
    assert "GPU quota exceeded" in str(first[2].outcome)
    assert len(refused) == 18  # the first refusals of the namespace go to the API to confirm
    # The API already shows the two (a confirmation reads it); the indexes do not yet.
    shown = tuple(DeploymentFacts(f"md-{i}", 4, ()) for i in range(2))
    confirmed = [(first[2], ModelDeployment.from_body(first[2].body))]
    admission._decide("acme", confirmed, _facts(*shown), from_indexes=False)
    assert "GPU quota exceeded" in str(first[2].outcome)
    # A later batch decided from the lagging indexes: the two still count.
    later = [_review("md-late")]
    assert admission.admit_from_memory("acme", later, _facts()) == []  # confirmed < 1 s ago
    assert "GPU quota exceeded" in str(later[0].outcome)
    # The indexes show them: their entries go, and nothing is counted twice.
    again = [_review("md-0")]  # an update of an admitted one, same size: allowed
    admission.admit_from_memory("acme", again, _facts(*shown))
    assert again[0].outcome is None
    assert admission.in_flight.admitted("acme", {}, from_indexes=False) == {}


def test_a_standby_refuses_for_a_retry_and_a_bad_object_is_invalid() -> None:
    reviews = [_review("md-0"), admission.Review({"metadata": {"name": "bad"}, "spec": {}}, False)]
    admission.admit_all(None, "acme", reviews, Mode.STANDBY)  # type: ignore[arg-type]
    assert isinstance(reviews[0].outcome, admission.Standby)
    assert reviews[0].outcome.code == 503 and "try again" in str(reviews[0].outcome)
    assert isinstance(reviews[1].outcome, admission.Invalid) and reviews[1].outcome.code == 422


def _raycluster(generation: int, image: str = "serving:1") -> dict[str, Any]:
    return {
        "kind": "RayCluster",
        "metadata": {
            "name": "c",
            "namespace": "acme",
            "uid": "u1",
            "generation": generation,
            "resourceVersion": str(100 + generation),
        },
        "spec": {"headGroupSpec": {"template": {"spec": {"containers": [{"image": image}]}}}},
        "status": {"state": "ready"},
    }


def test_a_rayclusters_whole_spec_is_kept_only_until_its_drift_check() -> None:
    cache = ChildCache()
    cache.observe(_raycluster(1))
    unchecked = cache.unchecked_raycluster("acme", "c")
    assert unchecked is not None and unchecked["spec"] == _raycluster(1)["spec"]  # no GET needed
    # What the guarded revert patch tests against.
    assert unchecked["metadata"]["resourceVersion"] == "101"
    cache.record_drift_check(unchecked)
    assert cache.drift_checked("acme", "c")
    assert cache.unchecked_raycluster("acme", "c") is None  # trimmed: memory stays flat
    cache.observe(_raycluster(1))  # a status update: still checked, still trimmed
    assert cache.unchecked_raycluster("acme", "c") is None
    cache.observe(_raycluster(2, image="evil:1"))  # someone edited the spec
    assert not cache.drift_checked("acme", "c")
    changed = cache.unchecked_raycluster("acme", "c")
    assert changed is not None and "evil:1" in str(changed["spec"])


def test_a_watched_body_is_reconciled_with_the_status_we_last_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconcile, "_last_written", {})
    body = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    body["metadata"].update(uid="u1", generation=2)
    md = ModelDeployment.from_body(body)
    written = {"conditions": [{"type": "Reconciled", "status": "True"}], "observedGeneration": 2}
    assert reconcile.as_last_written(body) == body  # never written: as watched
    reconcile._remember(md, written)
    # An event from before our write: taken with what we wrote (no transition twice).
    assert reconcile.as_last_written({**body, "status": {}})["status"] == written  # type: ignore[index]
    # A spec older than the one we reconciled: read afresh.
    older = {**body, "metadata": {**body["metadata"], "generation": 1}}
    assert reconcile.as_last_written(older) is None
    # Another object under the same name (deleted and created again): as watched.
    other = {**body, "metadata": {**body["metadata"], "uid": "u2"}, "status": {}}
    assert reconcile.as_last_written(other) == other
