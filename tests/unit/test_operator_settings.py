"""The operator's environment (set by the chart) → render options; peering verdicts."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from tramontane.controller import peering, settings
from tramontane.render.rayservice import RenderOptions
from tramontane.render.tenant import TenantOptions

NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)


def test_unset_environment_keeps_the_defaults() -> None:
    assert settings.render_options({}) == RenderOptions()
    assert settings.tenant_options({}) == TenantOptions()


def test_chart_environment_reaches_the_render_options() -> None:
    env = {
        "TRAMONTANE_SERVING_IMAGE": "registry.acme.eu/mirror/serving:0.1.0",
        "TRAMONTANE_CLUSTER_DOMAIN": "acme.internal",
        "TRAMONTANE_SERVING_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "TRAMONTANE_MONITORING_NAMESPACES": "monitoring, observability",
        "TRAMONTANE_API_SERVER_CIDRS": "10.0.0.1/32",
    }
    render = settings.render_options(env)
    assert render.serving_image == "registry.acme.eu/mirror/serving:0.1.0"
    assert render.cluster_domain == "acme.internal"
    assert render.otlp_endpoint == "http://otel-collector.observability:4318"
    tenants = settings.tenant_options(env)
    assert tenants.monitoring_namespaces == ("monitoring", "observability")
    assert tenants.api_server_cidrs == ("10.0.0.1/32",)
    # An empty list is a choice (no monitoring namespace may scrape), not "unset".
    assert (
        settings.tenant_options({"TRAMONTANE_MONITORING_NAMESPACES": ""}).monitoring_namespaces
        == ()
    )


def test_chart_pod_sizes_reach_the_render_options() -> None:
    env = {
        "TRAMONTANE_HEAD_CPU": "500m",
        "TRAMONTANE_HEAD_MEMORY": "3Gi",
        "TRAMONTANE_WORKER_CPU_PER_GPU": "12",
        "TRAMONTANE_WORKER_MEMORY_PER_GPU": "80Gi",
        "TRAMONTANE_CPU_WORKER_CPU": "1500m",
        "TRAMONTANE_CPU_WORKER_MEMORY": "6Gi",
    }
    render = settings.render_options(env)
    assert (render.head_cpu, render.head_memory) == ("500m", "3Gi")
    assert (render.cpu_per_gpu, render.memory_per_gpu) == ("12", "80Gi")
    assert (render.cpu_worker_cpu, render.cpu_worker_memory) == ("1500m", "6Gi")


def test_chart_tolerations_and_node_selector_reach_the_render_options() -> None:
    taint = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    render = settings.render_options(
        {
            "TRAMONTANE_SERVING_TOLERATIONS": json.dumps([taint]),
            "TRAMONTANE_SERVING_NODE_SELECTOR": '{"pool": "inference"}',
            "TRAMONTANE_AUTOSCALER_CPU": "100m",
        }
    )
    assert render.pod_tolerations == (taint,)
    assert render.pod_node_selector == (("pool", "inference"),)
    assert render.autoscaler_cpu == "100m"
    # The chart renders empty values as [] and {}: nothing added.
    empty = settings.render_options(
        {"TRAMONTANE_SERVING_TOLERATIONS": "[]", "TRAMONTANE_SERVING_NODE_SELECTOR": "{}"}
    )
    assert (empty.pod_tolerations, empty.pod_node_selector) == ((), ())


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        (
            "TRAMONTANE_SERVING_TOLERATIONS",
            "{not json",
            "TRAMONTANE_SERVING_TOLERATIONS is not JSON",
        ),
        (
            "TRAMONTANE_SERVING_TOLERATIONS",
            "{}",
            "TRAMONTANE_SERVING_TOLERATIONS must be a JSON list",
        ),
        (
            "TRAMONTANE_SERVING_NODE_SELECTOR",
            "[]",
            "TRAMONTANE_SERVING_NODE_SELECTOR must be a JSON object",
        ),
    ],
)
def test_bad_placement_settings_stop_the_operator_with_the_variable_named(
    variable: str, value: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        settings.render_options({variable: value})


def test_a_bad_pod_size_stops_the_operator_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="TRAMONTANE_HEAD_MEMORY='8 GB' is not a Kubernetes"):
        settings.render_options({"TRAMONTANE_HEAD_MEMORY": "8 GB"})


def _record(priority: int, seconds_ago: int, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_older_replicas_have_higher_priority() -> None:
    older = peering.priority_from_start(1000.0, tie_break=0)
    assert older > peering.priority_from_start(1000.001, tie_break=2**20 - 1)
    assert peering.priority_from_start(time.time()) < 2**63  # the API server's int64


def test_replicas_started_in_the_same_millisecond_do_not_tie() -> None:
    """kopf pauses every replica whose priority ties: the replicas of a fresh Deployment, which
    start together, must still have one active."""
    now = time.time()
    assert peering.priority_from_start(now, 1) != peering.priority_from_start(now, 2)
    # By default the tie-break is random (20 bits): draws differ.
    assert len({peering.priority_from_start(now) for _ in range(20)}) > 1


def test_alone_or_highest_is_active() -> None:
    assert peering.is_active({}, "me", 10, NOW)
    assert peering.is_active({"me": _record(10, 0)}, "me", 10, NOW)
    assert peering.is_active({"me": _record(10, 0), "younger": _record(5, 0)}, "me", 10, NOW)


def test_a_live_older_peer_makes_us_wait() -> None:
    assert not peering.is_active({"older": _record(20, 5)}, "me", 10, NOW)


def test_a_tie_pauses_everyone_as_kopf_does() -> None:
    assert not peering.is_active({"twin": _record(10, 5)}, "me", 10, NOW)


def test_an_expired_peer_does_not_count() -> None:
    assert peering.is_active({"crashed": _record(20, 61, lifetime=60)}, "me", 10, NOW)
    assert peering.is_active({"gone": _record(20, 0, lifetime=0)}, "me", 10, NOW)
    assert peering.is_active({"garbage": {"priority": 99}}, "me", 10, NOW)
