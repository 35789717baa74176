"""The operator's environment (set by the chart) → its settings and render options; peering
verdicts."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fullchain import helm
from tramontane.controller import peering
from tramontane.controller.settings import TramontaneSettings
from tramontane.render.rayservice import RenderOptions
from tramontane.render.tenant import TenantOptions

NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)
CHART = Path(__file__).resolve().parents[2] / "charts" / "tramontane"
# Variables of the chart's operator container that are not settings, and why.
NOT_SETTINGS = {
    "POD_ID": "kopf's identity among the peers, read by kopf (main.run sets it)",
    "OTEL_SERVICE_NAME": "OpenTelemetry's own variable, read as the SDK does (telemetry.py)",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "OpenTelemetry's own variable (telemetry.py)",
}
# Settings the chart does not set (a development run's), by variable, and why: none today.
DEVELOPMENT_ONLY: dict[str, str] = {}


def _chart_environment() -> list[dict[str, Any]]:
    """The operator container's env of the chart, with the optional variables switched on."""
    out = helm(
        "template", "tramontane", str(CHART), "--namespace", "tramontane-system",
        "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4318",
        "--set", "tracing.servingOtlpEndpoint=http://otel-collector.observability:4318",
        "--show-only", "templates/deployment.yaml",
    )  # fmt: skip
    (deployment,) = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (operator,) = [c for c in containers if c["name"] == "operator"]
    return list(operator["env"])


def test_every_chart_variable_is_a_setting_and_every_setting_is_set_by_the_chart() -> None:
    env = _chart_environment()
    in_chart = {variable["name"] for variable in env} - NOT_SETTINGS.keys()
    fields = {str(field.alias) for field in TramontaneSettings.model_fields.values()}
    assert in_chart - fields == set(), "chart variables that no setting reads"
    assert fields - in_chart - DEVELOPMENT_ONLY.keys() == set(), "settings the chart never sets"
    # And the chart's values are valid settings.
    values = {variable["name"]: variable["value"] for variable in env if "value" in variable}
    assert TramontaneSettings.from_env(values).webhook_config == ""


def test_every_setting_has_a_variable_a_default_and_a_doc() -> None:
    for name, field in TramontaneSettings.model_fields.items():
        assert field.alias, name
        assert not field.is_required(), name
        assert field.description and "\n" not in field.description, name


def test_unset_environment_keeps_the_defaults() -> None:
    assert TramontaneSettings.from_env({}).render_options() == RenderOptions()
    assert TramontaneSettings.from_env({}).tenant_options() == TenantOptions()
    config = TramontaneSettings.from_env({})
    assert (config.metrics_port, config.reconcile_workers, config.peering) == (8080, 16, None)
    assert config.webhook_config == "tramontane.dev"


def test_blank_variables_are_unset_except_where_empty_is_a_value() -> None:
    config = TramontaneSettings.from_env(
        {"TRAMONTANE_PEERING": "", "TRAMONTANE_WEBHOOK_CERT": "", "TRAMONTANE_HEAD_CPU": " ",
         "TRAMONTANE_WEBHOOK_CONFIG": "", "TRAMONTANE_API_SERVER_CIDRS": ""}
    )  # fmt: skip
    assert (config.peering, config.webhook_cert, config.head_cpu) == (None, None, "2")
    assert (config.webhook_config, config.api_server_cidrs) == ("", ())


def test_a_bad_number_stops_the_operator_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="TRAMONTANE_METRICS_PORT='http': Input should be a valid"):
        TramontaneSettings.from_env({"TRAMONTANE_METRICS_PORT": "http"})
    with pytest.raises(ValueError, match="TRAMONTANE_RECONCILE_WORKERS='0': Input should be great"):
        TramontaneSettings.from_env({"TRAMONTANE_RECONCILE_WORKERS": "0"})


def test_chart_environment_reaches_the_render_options() -> None:
    env = {
        "TRAMONTANE_SERVING_IMAGE": "registry.acme.eu/mirror/serving:0.1.0",
        "TRAMONTANE_CLUSTER_DOMAIN": "acme.internal",
        "TRAMONTANE_SERVING_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "TRAMONTANE_MONITORING_NAMESPACES": "monitoring, observability",
        "TRAMONTANE_API_SERVER_CIDRS": "10.0.0.1/32",
    }
    render = TramontaneSettings.from_env(env).render_options()
    assert render.serving_image == "registry.acme.eu/mirror/serving:0.1.0"
    assert render.cluster_domain == "acme.internal"
    assert render.otlp_endpoint == "http://otel-collector.observability:4318"
    tenants = TramontaneSettings.from_env(env).tenant_options()
    assert tenants.monitoring_namespaces == ("monitoring", "observability")
    assert tenants.api_server_cidrs == ("10.0.0.1/32",)
    # An empty list is a choice (no monitoring namespace may scrape), not "unset".
    assert (
        TramontaneSettings.from_env({"TRAMONTANE_MONITORING_NAMESPACES": ""})
        .tenant_options()
        .monitoring_namespaces
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
    render = TramontaneSettings.from_env(env).render_options()
    assert (render.head_cpu, render.head_memory) == ("500m", "3Gi")
    assert (render.cpu_per_gpu, render.memory_per_gpu) == ("12", "80Gi")
    assert (render.cpu_worker_cpu, render.cpu_worker_memory) == ("1500m", "6Gi")


def test_chart_tolerations_and_node_selector_reach_the_render_options() -> None:
    taint = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    render = TramontaneSettings.from_env(
        {
            "TRAMONTANE_SERVING_TOLERATIONS": json.dumps([taint]),
            "TRAMONTANE_SERVING_NODE_SELECTOR": '{"pool": "inference"}',
            "TRAMONTANE_AUTOSCALER_CPU": "100m",
        }
    ).render_options()
    assert render.pod_tolerations == (taint,)
    assert render.pod_node_selector == (("pool", "inference"),)
    assert render.autoscaler_cpu == "100m"
    # The chart renders empty values as [] and {}: nothing added.
    empty = TramontaneSettings.from_env(
        {"TRAMONTANE_SERVING_TOLERATIONS": "[]", "TRAMONTANE_SERVING_NODE_SELECTOR": "{}"}
    ).render_options()
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
        TramontaneSettings.from_env({variable: value})


def test_a_bad_pod_size_stops_the_operator_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="TRAMONTANE_HEAD_MEMORY='8 GB' is not a Kubernetes"):
        TramontaneSettings.from_env({"TRAMONTANE_HEAD_MEMORY": "8 GB"})


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
