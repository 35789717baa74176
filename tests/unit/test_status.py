"""What a ModelDeployment's status says about its model source and its failing pods."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tramontane.api.conditions import ConditionStatus
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import RenderOptions
from tramontane.render.status import (
    MESSAGE_LIMIT,
    ClaimState,
    Observed,
    PodProblem,
    ResidencyVerdict,
    compute_status,
    pod_problem,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RAYSERVICE = {"status": {"activeServiceStatus": {"rayClusterName": "tiny-x"}}}


def md(uri: str = "pvc://models/tiny") -> ModelDeployment:
    return ModelDeployment.from_body(
        {
            "apiVersion": "tramontane.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": "team", "generation": 3},
            "spec": {
                "model": {"uri": uri},
                "accelerator": {"type": "CPU", "count": 0},
            },
        }
    )


def raycluster(ready: int, head_ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": "tiny-x"},
        "status": {
            "state": "ready" if head_ready else "",
            "readyWorkerReplicas": ready,
            "availableWorkerReplicas": ready,
        },
    }


def conditions(observed: Observed, uri: str = "pvc://models/tiny") -> dict[str, tuple[str, str]]:
    status = compute_status(md(uri), observed, previous=None, options=RenderOptions(), now=NOW)
    return {c.type: (c.status.value, c.reason) for c in status.conditions}


def test_a_missing_claim_says_claim_not_found_and_keeps_the_deployment_unready() -> None:
    observed = Observed(RAYSERVICE, raycluster(0), claims=(ClaimState("models", None),))
    got = conditions(observed)
    assert got["ModelSourceReady"] == ("False", "ClaimNotFound")
    assert got["Ready"] == ("False", "ClaimNotFound")


def test_a_pending_claim_is_not_bound_and_a_bound_one_is_ready() -> None:
    pending = Observed(RAYSERVICE, raycluster(1), claims=(ClaimState("models", "Pending"),))
    assert conditions(pending)["ModelSourceReady"] == ("False", "ClaimNotBound")
    bound = Observed(RAYSERVICE, raycluster(1), claims=(ClaimState("models", "Bound"),))
    got = conditions(bound)
    assert got["ModelSourceReady"] == ("True", "ClaimBound")
    assert got["Ready"] == ("True", "Ready")


def test_a_remote_source_is_left_to_the_engine() -> None:
    got = conditions(Observed(RAYSERVICE, raycluster(1)), uri="s3://eu-bucket/llama")
    assert got["ModelSourceReady"] == ("True", "FetchedByEngine")


def crashing_pod(name: str = "tiny-x-head-abc") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "ray-head",
                    "restartCount": 4,
                    "state": {
                        "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s"}
                    },
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        },
    }


def test_a_crash_looping_container_is_reported_with_its_reason_exit_code_and_restarts() -> None:
    problem = pod_problem(crashing_pod())
    assert problem is not None
    assert problem.reason == "CrashLoopBackOff"
    assert "ray-head" in problem.message
    assert "exit code 137 (OOMKilled)" in problem.message
    assert "4 restarts" in problem.message


@pytest.mark.parametrize(
    "waiting", [{"reason": "ContainerCreating"}, {"reason": "PodInitializing"}, {}]
)
def test_a_pod_that_is_still_starting_is_no_problem(waiting: dict[str, str]) -> None:
    pod = crashing_pod()
    pod["status"]["containerStatuses"][0]["state"] = (
        {"waiting": waiting} if waiting else {"running": {}}
    )
    assert pod_problem(pod) is None


def test_failing_pods_make_ready_say_the_containers_reason_while_unavailable() -> None:
    problem = pod_problem(crashing_pod())
    assert problem is not None
    down = Observed(RAYSERVICE, raycluster(0, head_ready=False), pod_problems=(problem,))
    got = conditions(down)
    assert got["PodsHealthy"] == ("False", "CrashLoopBackOff")
    assert got["Ready"] == ("False", "CrashLoopBackOff")
    # An extra replica crash-looping while the minimum serves: still Ready, but reported.
    serving = Observed(RAYSERVICE, raycluster(1), pod_problems=(problem,))
    got = conditions(serving)
    assert got["PodsHealthy"] == ("False", "CrashLoopBackOff")
    assert got["Ready"] == ("True", "Ready")


def test_a_serve_traceback_is_cut_to_its_end_in_the_condition() -> None:
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 2000 + "ValueError: bad"
    rayservice = {
        "status": {
            "activeServiceStatus": {
                "rayClusterName": "tiny-x",
                "applicationStatuses": {"tiny": {"status": "DEPLOY_FAILED", "message": traceback}},
            }
        }
    }
    status = compute_status(
        md(), Observed(rayservice, raycluster(1)), previous=None, options=RenderOptions(), now=NOW
    )
    available = next(c for c in status.conditions if c.type == "Available")
    assert available.reason == "ServeApplicationFailed"
    assert len(available.message) <= MESSAGE_LIMIT
    assert available.message.endswith("ValueError: bad")


def test_many_failing_pods_fit_one_message() -> None:
    problems = tuple(PodProblem(f"p{i}", "CrashLoopBackOff", "x" * 300) for i in range(20))
    status = compute_status(
        md(), Observed(RAYSERVICE, raycluster(0), pod_problems=problems), previous=None,
        options=RenderOptions(), now=NOW,
    )  # fmt: skip
    healthy = next(c for c in status.conditions if c.type == "PodsHealthy")
    assert len(healthy.message) <= MESSAGE_LIMIT


def test_an_upgrade_in_flight_says_which_cluster_serves_and_which_starts() -> None:
    both = {
        "status": {
            "activeServiceStatus": {"rayClusterName": "tiny-old"},
            "pendingServiceStatus": {"rayClusterName": "tiny-new"},
        }
    }
    status = compute_status(
        md(), Observed(both, raycluster(1)), previous=None, options=RenderOptions(), now=NOW
    )
    upgrading = next(c for c in status.conditions if c.type == "Upgrading")
    assert (upgrading.status.value, upgrading.reason) == ("True", "NewClusterStarting")
    assert "tiny-new" in upgrading.message and "tiny-old serves" in upgrading.message
    assert status.ray_cluster_name == "tiny-old"
    done = {"status": {"activeServiceStatus": {"rayClusterName": "tiny-new"}}}
    status = compute_status(
        md(), Observed(done, raycluster(1)), previous=status, options=RenderOptions(), now=NOW
    )
    assert status.ray_cluster_name == "tiny-new"
    assert conditions(Observed(done, raycluster(1)))["Upgrading"] == ("False", "UpToDate")


def test_a_first_cluster_that_fails_to_deploy_says_why() -> None:
    pending = {
        "status": {
            "pendingServiceStatus": {
                "rayClusterName": "tiny-x",
                "applicationStatuses": {
                    "tiny": {"status": "DEPLOY_FAILED", "message": "RuntimeError: no memory"}
                },
            }
        }
    }
    status = compute_status(
        md(), Observed(pending, raycluster(1)), previous=None, options=RenderOptions(), now=NOW
    )
    available = next(c for c in status.conditions if c.type == "Available")
    assert available.reason == "ServeApplicationFailed"
    assert available.message.endswith("RuntimeError: no memory")


def test_an_upgrade_that_fails_says_so_while_the_old_cluster_serves() -> None:
    both = {
        "status": {
            "activeServiceStatus": {
                "rayClusterName": "tiny-old",
                "applicationStatuses": {"tiny": {"status": "RUNNING"}},
            },
            "pendingServiceStatus": {
                "rayClusterName": "tiny-new",
                "applicationStatuses": {
                    "tiny": {"status": "DEPLOY_FAILED", "message": "ValueError: bad arg"}
                },
            },
        }
    }
    got = conditions(Observed(both, raycluster(1)))
    assert got["Upgrading"] == ("True", "NewClusterFailing")
    assert got["Available"] == ("True", "ReplicasReady")


def test_a_withdrawn_deployment_is_not_reported_as_applied() -> None:
    observed = Observed(
        None, None,
        residency=ResidencyVerdict(
            ConditionStatus.FALSE, "ResidencyPolicyNotFound", "ResidencyPolicy eu is gone"
        ),
    )  # fmt: skip
    got = conditions(observed)
    assert got["Reconciled"] == ("False", "Withdrawn")
    assert got["ResidencyCompliant"] == ("False", "ResidencyPolicyNotFound")
    assert got["Ready"] == ("False", "ResidencyPolicyNotFound")


def test_a_deployment_whose_tenancy_is_in_doubt_is_held_not_applied() -> None:
    observed = Observed(
        RAYSERVICE, raycluster(1),
        residency=ResidencyVerdict(
            ConditionStatus.UNKNOWN, "TenancyMismatch", "namespace team is labelled ..."
        ),
    )  # fmt: skip
    got = conditions(observed)
    assert got["Reconciled"] == ("False", "Held")
    assert got["ResidencyCompliant"] == ("Unknown", "TenancyMismatch")
    assert got["Ready"][0] == "False"
