"""The webhook's admission ledger on the real API server: how operator replicas agree on quota.

Each replica's requests for one namespace are serialised in-process; between replicas, the
ledger's compare-and-swap decides. Two ledgers here stand for two replicas admitting at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube import Kubectl
from tramontane.controller.admission import AdmissionLedger
from tramontane.controller.kube import Kube


@pytest.fixture
def kube(cluster: Kubectl) -> Kube:
    """The operator's own client, on the suite's cluster."""
    return Kube.from_environment(str(cluster.kubeconfig))


def test_of_two_replicas_admitting_at_once_the_second_write_loses_and_sees_the_first(
    kube: Kube, namespace: str
) -> None:
    first, second = AdmissionLedger(kube, namespace), AdmissionLedger(kube, namespace)
    assert first.read() == {} and second.read() == {}
    # Both checked the quota against an empty ledger; only one may record on that basis.
    assert first.record("a", 4)
    assert not second.record("b", 4)  # the Lease was created meanwhile: 409, start over
    assert second.read() == {"a": 4}
    assert second.record("b", 4)
    assert not first.record("c", 1)  # its read predates b: 409 again
    assert first.read() == {"a": 4, "b": 4}


def test_an_entry_expires_and_a_garbled_ledger_counts_nothing(
    kube: Kube, namespace: str, cluster: Kubectl
) -> None:
    stale = AdmissionLedger(kube, namespace)
    stale.read()
    stale.TTL_S = -1.0  # recorded already expired, as an entry is TTL_S after its create
    assert stale.record("gone", 8)
    ledger = AdmissionLedger(kube, namespace)
    assert ledger.read() == {}
    cluster.run("annotate", "lease", AdmissionLedger.NAME, "-n", namespace, "--overwrite",
                f"{AdmissionLedger.ANNOTATION}=not json")  # fmt: skip
    # The ledger keeps the Lease it last saw (no read per admission): the write from elsewhere
    # makes its next write fail, and only then does it read again.
    assert not ledger.record("fresh", 2)
    assert ledger.read() == {}
    assert ledger.record("fresh", 2)
    assert AdmissionLedger(kube, namespace).read() == {"fresh": 2}


def test_in_the_steady_state_the_ledger_reads_nothing_and_drops_what_the_watch_shows(
    kube: Kube, namespace: str
) -> None:
    ledger = AdmissionLedger(kube, namespace)
    assert ledger.read() == {}
    assert ledger.record("a", 2)
    reads: list[str] = []
    original = kube.get

    def counted_get(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        reads.append(str(args))
        return original(*args, **kwargs)

    kube.get = counted_get  # type: ignore[method-assign]
    assert ledger.read() == {"a": 2}
    # "a" is in the indexes now with its 2 GPUs: its entry has done its job.
    assert ledger.record("b", 4, seen={"a": 2})
    assert ledger.read() == {"b": 4}
    assert reads == []
    kube.get = original  # type: ignore[method-assign]
    assert AdmissionLedger(kube, namespace).read() == {"b": 4}
