"""The operator's metrics as Prometheus reads them: condition counts, per-deployment conditions and
tenant quota gauges, and their removal when the object is gone."""

from __future__ import annotations

import uuid

from tramontane.controller import telemetry


def value(name: str, **labels: str) -> float | None:
    return telemetry.REGISTRY.get_sample_value(name, labels)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the registry is shared by the whole session


def test_a_kinds_reconcile_series_exist_at_zero_before_any_reconcile() -> None:
    kind = unique("Kind")
    telemetry.KindMetrics(kind)
    assert value("tramontane_reconcile_total", kind=kind, result="error") == 0
    assert value("tramontane_reconcile_total", kind=kind, result="success") == 0
    assert value("tramontane_reconcile_duration_seconds_count", kind=kind) == 0


def test_kind_metrics_count_objects_not_updates() -> None:
    kind = unique("Kind")
    counts = telemetry.KindMetrics(kind)
    counts.update("a", {"Ready": "False"})
    counts.update("a", {"Ready": "True"})
    counts.update("b", {"Ready": "True"})
    ready = {s: value("tramontane_managed_objects", kind=kind, condition="Ready", status=s)
             for s in telemetry.STATUSES}  # fmt: skip
    assert ready == {"True": 2, "False": 0, "Unknown": 0}
    counts.update("a", None)
    assert value("tramontane_managed_objects", kind=kind, condition="Ready", status="True") == 1


def test_each_deployment_has_one_series_per_condition_status_set_to_one_for_its_status() -> None:
    tenant, name = unique("team"), "llama"
    conditions = telemetry.DeploymentMetrics(unique("ModelDeployment"))
    conditions.update(f"{tenant}/{name}", {"Ready": "False", "Reconciled": "True"})
    metric = "tramontane_modeldeployment_status_condition"
    labels = {"tenant": tenant, "deployment": name}
    assert value(metric, **labels, condition="Ready", status="False") == 1
    assert value(metric, **labels, condition="Ready", status="True") == 0
    assert value(metric, **labels, condition="Ready", status="Unknown") == 0
    assert value(metric, **labels, condition="Reconciled", status="True") == 1

    conditions.update(f"{tenant}/{name}", {"Ready": "True"})  # Reconciled dropped
    assert value(metric, **labels, condition="Ready", status="True") == 1
    assert value(metric, **labels, condition="Ready", status="False") == 0
    assert value(metric, **labels, condition="Reconciled", status="True") is None

    conditions.update(f"{tenant}/{name}", None)  # deleted
    for status in telemetry.STATUSES:
        assert value(metric, **labels, condition="Ready", status=status) is None


def test_tenant_quota_gauges_follow_the_tenant_and_go_with_it() -> None:
    tenant = unique("tenant")
    metrics = telemetry.TenantMetrics(unique("Tenant"))
    metrics.update(tenant, {"Ready": "True"})
    metrics.quota(tenant, gpus=16, gpus_requested=12, deployments=10, deployments_in_use=3)
    assert value("tramontane_tenant_gpu_quota", tenant=tenant) == 16
    assert value("tramontane_tenant_gpu_requested", tenant=tenant) == 12
    assert value("tramontane_tenant_model_deployment_quota", tenant=tenant) == 10
    assert value("tramontane_tenant_model_deployments", tenant=tenant) == 3

    metrics.quota(tenant, gpus=16, gpus_requested=16, deployments=10, deployments_in_use=4)
    assert value("tramontane_tenant_gpu_requested", tenant=tenant) == 16

    metrics.update(tenant, None)
    for gauge in ("gpu_quota", "gpu_requested", "model_deployment_quota", "model_deployments"):
        assert value(f"tramontane_tenant_{gauge}", tenant=tenant) is None
    metrics.update(tenant, None)  # a second DELETED event (e.g. after a relist) is harmless
