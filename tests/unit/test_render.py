"""Pure rendering of ModelDeployments into KubeRay RayServices, PodMonitors and status."""

from __future__ import annotations

import ast
import importlib.util
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import (
    RenderOptions,
    quantity_bytes,
    quantity_cores,
    render_children,
    render_podmonitor,
    render_rayservice,
    scaled_quantity,
    worker_bounds_patch,
)
from tramontane.render.status import Observed, compute_status, transitions
from tramontane.serving.config import parse_args

REPO = Path(__file__).resolve().parents[2]
OPTIONS = RenderOptions()
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def md(**spec: Any) -> ModelDeployment:
    body: dict[str, Any] = yaml.safe_load(
        (REPO / "config/samples/modeldeployment.yaml").read_text()
    )
    body["metadata"] |= {"uid": "1234-abcd", "generation": 2}
    body["spec"].update(spec)
    return ModelDeployment.from_body(body)


def all_containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    config = rayservice["spec"]["rayClusterConfig"]
    pods = [config["headGroupSpec"]["template"]] + [
        g["template"] for g in config["workerGroupSpecs"]
    ]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_every_container_is_pod_security_restricted() -> None:
    rayservice = render_rayservice(md(), OPTIONS)
    config = rayservice["spec"]["rayClusterConfig"]
    for container in all_containers(rayservice):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert config["autoscalerOptions"]["securityContext"]["capabilities"]["drop"] == ["ALL"]
    groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
    for group in groups:
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_gpu_worker_group_targets_h100_nodes_with_the_right_gpus_and_scaling() -> None:
    deployment = md(
        accelerator={"type": "H100", "count": 4},
        engine={"tensorParallelSize": 4},
        scaling={"minReplicas": 2, "maxReplicas": 5},
    )
    config = render_rayservice(deployment, OPTIONS)["spec"]["rayClusterConfig"]
    (group,) = config["workerGroupSpecs"]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (2, 5, 2)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expression = term["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert expression["key"] == "nvidia.com/gpu.product"
    assert "NVIDIA-H100-80GB-HBM3" in expression["values"]
    assert config["enableInTreeAutoscaling"] is True
    assert config["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head_limits = config["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_limits["limits"]


def test_cpu_accelerator_has_no_gpu_request_toleration_or_affinity() -> None:
    deployment = md(accelerator={"type": "CPU", "count": 0})
    (group,) = render_rayservice(deployment, OPTIONS)["spec"]["rayClusterConfig"][
        "workerGroupSpecs"
    ]
    pod = group["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod
    assert "affinity" not in pod


def _pod_resources(rayservice: dict[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
    config = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": config["headGroupSpec"], "worker": config["workerGroupSpecs"][0]}
    return {
        name: group["template"]["spec"]["containers"][0]["resources"]
        for name, group in groups.items()
    }


def test_pod_sizes_default_to_the_installation_and_gpu_workers_grow_with_the_gpus() -> None:
    options = RenderOptions(
        head_cpu="500m", head_memory="3Gi", cpu_per_gpu="1500m", memory_per_gpu="48Gi"
    )
    resources = _pod_resources(
        render_rayservice(md(accelerator={"type": "H100", "count": 2}), options)
    )
    assert resources["head"]["requests"] == {"cpu": "500m", "memory": "3Gi"}
    assert resources["worker"]["requests"] == {
        "cpu": "3000m",
        "memory": "96Gi",
        "nvidia.com/gpu": "2",
    }
    # The engine's pod: requests = limits (Guaranteed QoS), it sizes itself from what it was given.
    assert resources["worker"]["requests"] == resources["worker"]["limits"]
    # The head: its request reserved, a burst to 500m allowed for its start-up, memory capped.
    assert resources["head"]["limits"] == {"cpu": "500m", "memory": "3Gi"}


def test_a_deployment_sets_its_own_pod_sizes_and_keeps_the_defaults_it_leaves_out() -> None:
    deployment = md(
        accelerator={"type": "CPU", "count": 0},
        resources={"head": {"memory": "2500Mi"}, "worker": {"cpu": "1500m", "memory": "6Gi"}},
    )
    options = RenderOptions(head_cpu="250m", cpu_worker_cpu="3", cpu_worker_memory="12Gi")
    resources = _pod_resources(render_rayservice(deployment, options))
    assert resources["head"]["requests"] == {"cpu": "250m", "memory": "2500Mi"}
    assert resources["worker"]["limits"] == {"cpu": "1500m", "memory": "6Gi"}


def test_platform_tolerations_and_node_selector_add_to_residency_and_gpu_placement() -> None:
    pool_taint = {
        "key": "dedicated",
        "operator": "Equal",
        "value": "inference",
        "effect": "NoSchedule",
    }
    options = RenderOptions(
        pod_tolerations=(pool_taint,), pod_node_selector=(("pool", "inference"),)
    )
    region = {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["eu-west-3"]}
    rayservice = render_rayservice(
        md(accelerator={"type": "H100", "count": 1}), options, placement=[region]
    )
    for pod in pod_specs(rayservice):
        assert pool_taint in pod["tolerations"]
        assert pod["nodeSelector"] == {"pool": "inference"}
        # Residency still pins every pod: the platform's settings only add to it.
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert region in terms["nodeSelectorTerms"][0]["matchExpressions"]
    worker = pod_specs(rayservice)[1]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker[
        "tolerations"
    ]


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["containers"][0]["env"]}


def test_cpu_workers_size_vllms_kv_cache_from_their_memory_limit_not_the_machines() -> None:
    deployment = md(
        accelerator={"type": "CPU", "count": 0}, resources={"worker": {"memory": "6Gi"}}
    )
    head, worker = pod_specs(render_rayservice(deployment, OPTIONS))
    assert _env(worker)["VLLM_CPU_KVCACHE_SPACE"] == "1"  # a quarter of 6 GiB, in whole GiB
    big = md(accelerator={"type": "CPU", "count": 0}, resources={"worker": {"memory": "64000Mi"}})
    assert _env(pod_specs(render_rayservice(big, OPTIONS))[1])["VLLM_CPU_KVCACHE_SPACE"] == "15"
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(head)
    # No run-time C++ build on CPU: the image has no compiler (sampling killed the engine).
    assert _env(worker)["TORCH_COMPILE_DISABLE"] == "1"
    gpu_worker = pod_specs(render_rayservice(md(), OPTIONS))[1]
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(gpu_worker)


def test_the_head_offers_no_cpu_or_gpu_so_engines_land_on_workers() -> None:
    head = render_rayservice(md(), OPTIONS)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize(
    ("quantity", "size"),
    [("6Gi", 6 * 2**30), ("512Mi", 2**29), ("1.5Gi", 3 * 2**29), ("2G", 2 * 10**9), ("1000", 1000)],
)
def test_quantity_bytes(quantity: str, size: int) -> None:
    assert quantity_bytes(quantity) == size


@pytest.mark.parametrize("bad", ["500m", "lots", "-1Gi"])
def test_quantity_bytes_refuses_what_is_not_memory(bad: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        quantity_bytes(bad)


def test_the_autoscaler_sidecar_is_sized_by_the_installation() -> None:
    options = RenderOptions(autoscaler_cpu="100m", autoscaler_memory="256Mi")
    config = render_rayservice(md(), options)["spec"]["rayClusterConfig"]
    resources = config["autoscalerOptions"]["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "100m", "memory": "256Mi"}


@pytest.mark.parametrize(
    ("request_cpu", "limit"), [("250m", "500m"), ("0.5", "0.5"), ("2", "2"), ("1500m", "1500m")]
)
def test_the_head_may_burst_to_500m_and_keeps_a_larger_request_as_its_limit(
    request_cpu: str, limit: str
) -> None:
    resources = _pod_resources(render_rayservice(md(), RenderOptions(head_cpu=request_cpu)))
    assert resources["head"]["requests"]["cpu"] == request_cpu
    assert resources["head"]["limits"]["cpu"] == limit


@pytest.mark.parametrize(("quantity", "cores"), [("250m", "0.25"), ("2", "2"), ("1.5", "1.5")])
def test_quantity_cores_reads_millicores_and_cores(quantity: str, cores: str) -> None:
    assert quantity_cores(quantity) == Decimal(cores)


@pytest.mark.parametrize("bad", ["1Gi", "lots", "-1"])
def test_quantity_cores_refuses_what_is_not_cpu(bad: str) -> None:
    with pytest.raises(ValueError, match="not a CPU quantity"):
        quantity_cores(bad)


@pytest.mark.parametrize(
    ("quantity", "factor", "scaled"),
    [
        ("8", 4, "32"),
        ("500m", 3, "1500m"),
        ("1.5", 2, "3"),
        ("64Gi", 8, "512Gi"),
        ("0.25", 2, "0.5"),
    ],
)
def test_scaled_quantity_keeps_the_unit(quantity: str, factor: int, scaled: str) -> None:
    assert scaled_quantity(quantity, factor) == scaled


@pytest.mark.parametrize("bad", ["", "two", "-1", "1e3", "5 Gi", "5GB"])
def test_scaled_quantity_refuses_what_is_not_a_plain_quantity(bad: str) -> None:
    with pytest.raises(ValueError, match="not a plain Kubernetes quantity"):
        scaled_quantity(bad, 2)


def test_scale_sets_initial_replicas_of_workers_and_serve() -> None:
    deployment = md(replicas=3, scaling={"minReplicas": 1, "maxReplicas": 4})
    rayservice = render_rayservice(deployment, OPTIONS)
    assert rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 3
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    (engine,) = app["deployments"]
    assert engine["name"] == "TramontaneLLMServer:llama-3.1-8b-instruct"
    assert engine["autoscaling_config"]["initial_replicas"] == 3
    # Not in the args: a change of args redeploys every replica, the override does not.
    assert "autoscaling" not in app["args"]


def test_serve_config_imports_a_real_module_and_its_args_parse_on_the_serving_side() -> None:
    deployment = md()
    config = yaml.safe_load(render_rayservice(deployment, OPTIONS)["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module_name, _, attribute = app["import_path"].partition(":")
    # Found, not imported (it imports Ray; tests/serving/test_contract.py runs it for real).
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None, f"no module {module_name}"
    tree = ast.parse(Path(spec.origin).read_text())
    assert attribute in [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    parsed = parse_args(app["args"])
    expected = ServingArgs.from_model_deployment(deployment)
    assert parsed == expected.model_copy(update={"autoscaling": None})
    assert app["deployments"][0]["autoscaling_config"] == expected.autoscaling.serve_config()  # type: ignore[union-attr]
    assert parsed.model.served_name == "llama-3.1-8b-instruct"
    assert [a.name for a in parsed.adapters] == ["finance-reports", "contracts-legal"]
    assert parsed.tenant == "team-finance"


def pod_specs(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    config = rayservice["spec"]["rayClusterConfig"]
    return [config["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in config["workerGroupSpecs"]
    ]


def test_every_ray_pod_mounts_the_api_key_secret_read_only() -> None:
    for pod in pod_specs(render_rayservice(md(), OPTIONS)):
        assert {
            "name": "api-keys",
            "secret": {"secretName": "llama-3-8b-api-keys", "optional": True, "defaultMode": 0o440},
        } in pod["volumes"]
        (container,) = pod["containers"]
        assert {
            "name": "api-keys",
            "mountPath": "/etc/tramontane/api-keys",
            "readOnly": True,
        } in container["volumeMounts"]
        # The path the app reads keys from is the one mounted.
        assert ServingArgs.from_model_deployment(md()).api_keys_path == "/etc/tramontane/api-keys"


def test_every_ray_container_gets_the_otlp_endpoint_only_when_one_is_configured() -> None:
    traced = RenderOptions(otlp_endpoint="http://otel-collector.observability:4318")
    containers = all_containers(render_rayservice(md(), traced))
    assert len(containers) == 2  # head and worker: replicas may run on either
    for container in containers:
        otel = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("OTEL_")}
        assert otel == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
            "OTEL_SERVICE_NAME": "tramontane-serving",
        }
    for container in all_containers(render_rayservice(md(), OPTIONS)):
        assert not [e for e in container["env"] if e["name"].startswith("OTEL_")]


def test_every_ray_container_runs_the_haproxy_ingress_topology() -> None:
    """HAProxy (Ray Serve's HAProxy ingress) in every pod that may host a replica, and user code
    on the replica's own loop: what tramontane.serving.app's direct ingress relies on."""
    containers = all_containers(render_rayservice(md(), OPTIONS))
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_pvc_model_and_adapters_are_mounted_read_only_where_the_app_resolves_them() -> None:
    deployment = md(
        model={"uri": "pvc://llm-weights/llama/3.1-8b", "servedName": "llama-3.1-8b-instruct"},
        adapters=[
            {"name": "finance-reports", "uri": "pvc://llm-adapters/finance/v3"},
            {"name": "contracts-legal", "uri": "s3://acme-eu-models/adapters/legal-v1"},
            {"name": "audit", "uri": "pvc://llm-weights/adapters/audit"},
        ],
    )
    from tramontane.serving.config import adapter_sources, model_source  # noqa: PLC0415

    for pod in pod_specs(render_rayservice(deployment, OPTIONS)):
        claims = {
            v["name"]: v["persistentVolumeClaim"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert list(claims.values()) == [
            {"claimName": "llm-weights", "readOnly": True},
            {"claimName": "llm-adapters", "readOnly": True},
        ]
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/mnt/models/llm-weights", "/mnt/models/llm-adapters"} <= mounts
    args = ServingArgs.from_model_deployment(deployment)
    assert model_source(args.model.uri, "/mnt/models") == "/mnt/models/llm-weights/llama/3.1-8b"
    assert adapter_sources(args, "/mnt/models")["finance-reports"] == (
        "/mnt/models/llm-adapters/finance/v3"
    )
    # The sample's weights are in a bucket: no claim at all.
    assert not [
        v
        for pod in pod_specs(render_rayservice(md(), OPTIONS))
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]


def test_children_are_owned_by_the_modeldeployment_and_labelled() -> None:
    for child in render_children(md(), OPTIONS):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "tramontane.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": "llama-3-8b",
            "uid": "1234-abcd",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert child["metadata"]["labels"]["tramontane.dev/model-deployment"] == "llama-3-8b"
    monitor = render_podmonitor(md())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_rendering_is_deterministic() -> None:
    assert render_children(md(), OPTIONS) == render_children(md(), OPTIONS)


def raycluster(ready: int, available: int, head_ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama-3-8b-abcde"},
        "status": {
            "state": "ready" if head_ready else "",
            "readyWorkerReplicas": ready,
            "availableWorkerReplicas": available,
        },
    }


RAYSERVICE = {"status": {"pendingServiceStatus": {"rayClusterName": "llama-3-8b-abcde"}}}


def conditions_of(status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("observed", "available", "ready"),
    [
        (Observed(None, None, "409 Conflict: x"), ("False", "RayServiceMissing"),
         ("False", "ApplyFailed")),
        (Observed(RAYSERVICE, None), ("False", "WaitingForRayCluster"),
         ("False", "WaitingForRayCluster")),
        (Observed(RAYSERVICE, raycluster(0, 1, head_ready=False)), ("False", "HeadNotReady"),
         ("False", "HeadNotReady")),
        (Observed(RAYSERVICE, raycluster(0, 1)), ("False", "ReplicasNotReady"),
         ("False", "ReplicasNotReady")),
        (Observed(RAYSERVICE, raycluster(1, 1)), ("True", "ReplicasReady"), ("True", "Ready")),
    ],
)  # fmt: skip
def test_status_is_ready_only_when_applied_and_workers_ready(
    observed: Observed, available: tuple[str, str], ready: tuple[str, str]
) -> None:
    status = compute_status(md(), observed, previous=None, options=OPTIONS, now=NOW)
    conditions = conditions_of(status)
    assert conditions["Available"] == available
    assert conditions["Ready"] == ready
    assert conditions["Reconciled"][0] == ("False" if observed.apply_error else "True")
    assert all(c.observed_generation == 2 for c in status.conditions)
    assert status.observed_generation == 2


def test_failed_serve_application_makes_it_unavailable() -> None:
    rayservice = {
        "status": {
            "activeServiceStatus": {
                "rayClusterName": "llama-3-8b-abcde",
                "applicationStatuses": {
                    "llama-3-8b": {"status": "DEPLOY_FAILED", "message": "CUDA OOM"}
                },
            }
        }
    }
    status = compute_status(
        md(), Observed(rayservice, raycluster(1, 1)), previous=None, options=OPTIONS, now=NOW
    )
    available = next(c for c in status.conditions if c.type == "Available")
    assert available.reason == "ServeApplicationFailed"
    assert "CUDA OOM" in available.message


def _with_apps(**apps_by_status: dict[str, str]) -> dict[str, Any]:
    """A RayService whose status reports these application statuses, per status section."""
    return {
        **RAYSERVICE,
        "status": {
            section: {"rayClusterName": "llama-3-8b-abcde", "applicationStatuses": {
                name: {"status": state} for name, state in apps.items()}}
            for section, apps in apps_by_status.items()
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    ("rayservice", "available"),
    [
        # First deployment: the pods are up but the engine still loads.
        (_with_apps(pendingServiceStatus={"llama-3-8b": "DEPLOYING"}), False),
        (_with_apps(activeServiceStatus={"llama-3-8b": "RUNNING"}), True),
        # An upgrade: the old cluster serves while the new one deploys.
        (
            _with_apps(
                activeServiceStatus={"llama-3-8b": "RUNNING"},
                pendingServiceStatus={"llama-3-8b": "DEPLOYING"},
            ),
            True,
        ),
        # KubeRay has not reached the dashboard (nothing reported): the pods decide.
        (RAYSERVICE, True),
    ],
)
def test_available_requires_the_serve_application_running_once_kuberay_reports_it(
    rayservice: dict[str, Any], available: bool
) -> None:
    status = compute_status(
        md(), Observed(rayservice, raycluster(1, 1)), previous=None, options=OPTIONS, now=NOW
    )
    conditions = {c.type: c for c in status.conditions}
    assert (conditions["Available"].status == "True") is available
    assert (conditions["Ready"].status == "True") is available
    if not available:
        assert conditions["Available"].reason == "ServeApplicationNotRunning"
        assert "is DEPLOYING" in conditions["Available"].message


def test_transition_time_only_moves_when_a_condition_changes() -> None:
    ready = Observed(RAYSERVICE, raycluster(1, 1))
    first = compute_status(md(), ready, previous=None, options=OPTIONS, now=NOW)
    later = NOW.replace(hour=13)
    same = compute_status(md(), ready, previous=first, options=OPTIONS, now=later)
    assert same == first
    assert transitions(first, same) == []
    degraded = compute_status(
        md(), Observed(RAYSERVICE, raycluster(0, 1)), previous=first, options=OPTIONS, now=later
    )
    changed = {c.type for c in transitions(first, degraded)}
    assert changed == {"Available", "Ready"}
    reconciled = next(c for c in degraded.conditions if c.type == "Reconciled")
    assert reconciled.last_transition_time == NOW


def _cluster_spec_as_kuberay_compares_it(rayservice: dict[str, Any]) -> dict[str, Any]:
    """rayClusterConfig without what KubeRay ignores when it decides on a new cluster
    (generateHashWithoutReplicasAndWorkersToDelete: worker replicas, min and max)."""
    config = dict(rayservice["spec"]["rayClusterConfig"])
    config["workerGroupSpecs"] = [
        {k: v for k, v in group.items() if k not in ("replicas", "minReplicas", "maxReplicas")}
        for group in config["workerGroupSpecs"]
    ]
    return config


@pytest.mark.parametrize(
    "change",
    [
        {"model": {"uri": "s3://eu-models/llama-3-8b", "revision": "v2", "servedName": "llama"}},
        {"engine": {"maxModelLen": 4096}},
        {"adapters": []},
    ],
)
def test_an_engine_change_makes_kuberay_build_a_new_cluster(change: dict[str, Any]) -> None:
    before = render_rayservice(md(), OPTIONS)
    after = render_rayservice(md(**change), OPTIONS)
    assert _cluster_spec_as_kuberay_compares_it(before) != _cluster_spec_as_kuberay_compares_it(
        after
    )
    for rendered in (before, after):
        config = rendered["spec"]["rayClusterConfig"]
        templates = [config["headGroupSpec"]["template"]] + [
            g["template"] for g in config["workerGroupSpecs"]
        ]
        hashes = {t["metadata"]["annotations"]["tramontane.dev/engine-config"] for t in templates}
        assert len(hashes) == 1


def test_a_scaling_change_is_applied_in_place_without_a_new_cluster() -> None:
    before = render_rayservice(md(), OPTIONS)
    scaling = {"minReplicas": 2, "maxReplicas": 6, "targetOngoingRequests": 4,
               "upscaleDelaySeconds": 5, "downscaleDelaySeconds": 30}  # fmt: skip
    after = render_rayservice(md(scaling=scaling), OPTIONS)
    assert before["spec"]["serveConfigV2"] != after["spec"]["serveConfigV2"]
    # Serve applies it in place: the application's import path and args are unchanged.
    apps = [yaml.safe_load(r["spec"]["serveConfigV2"])["applications"][0] for r in (before, after)]
    assert apps[0]["args"] == apps[1]["args"]
    assert _cluster_spec_as_kuberay_compares_it(before) == _cluster_spec_as_kuberay_compares_it(
        after
    )


def test_new_worker_bounds_are_patched_onto_the_running_cluster_and_nothing_else() -> None:
    rendered = render_rayservice(md(scaling={"minReplicas": 2, "maxReplicas": 6}), OPTIONS)
    group = rendered["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    running = {
        "spec": {
            "workerGroupSpecs": [
                {"groupName": group["groupName"], "minReplicas": 1, "maxReplicas": 4,
                 "replicas": 3}
            ]
        }
    }  # fmt: skip
    operations = worker_bounds_patch(rendered, running)
    assert operations == [
        {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName",
         "value": group["groupName"]},
        {"op": "replace", "path": "/spec/workerGroupSpecs/0/minReplicas", "value": 2},
        {"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 6},
    ]  # fmt: skip
    running["spec"]["workerGroupSpecs"][0] |= {"minReplicas": 2, "maxReplicas": 6}
    assert worker_bounds_patch(rendered, running) == []
