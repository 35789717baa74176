"""ModelDeployment → KubeRay RayService (and the PodMonitor that scrapes it). Pure functions."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

from tramontane.api.labels import (
    DEPLOYMENT_LABEL,
    ENGINE_CONFIG_ANNOTATION,
    GPU_PRODUCT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    PART_OF_LABEL,
    RAY_NODE_TYPE_LABEL,
    TENANT_LABEL,
)
from tramontane.api.serving import (
    API_KEYS_MOUNT_PATH,
    MODEL_ROOT,
    RAY_SERVE_ENV,
    ServingArgs,
    engine_deployment_name,
)
from tramontane.api.v1alpha1 import AcceleratorType, ModelDeployment
from tramontane.render.owner import owner_reference

FIELD_MANAGER = "tramontane"
GPU_RESOURCE = "nvidia.com/gpu"
SERVE_PORT = 8000
METRICS_PORT = 8080
SERVING_SERVICE_NAME = "tramontane-serving"  # OTEL_SERVICE_NAME of the serving app's spans

# GPU product labels (as NVIDIA GPU feature discovery sets them) per accelerator type.
GPU_PRODUCTS: dict[AcceleratorType, tuple[str, ...]] = {
    AcceleratorType.H100: ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-NVL", "NVIDIA-H100-PCIe"),
    AcceleratorType.H200: ("NVIDIA-H200", "NVIDIA-H200-141GB-HBM3"),
    AcceleratorType.A100: (
        "NVIDIA-A100-SXM4-80GB",
        "NVIDIA-A100-SXM4-40GB",
        "NVIDIA-A100-80GB-PCIe",
        "NVIDIA-A100-PCIE-40GB",
    ),
    AcceleratorType.L40S: ("NVIDIA-L40S",),
}


@dataclass(frozen=True)
class RenderOptions:
    """Installation-wide settings (from the operator's configuration, not from tenants)."""

    serving_image: str = "ghcr.io/tramontane-dev/serving:0.1.0"
    ray_version: str = "2.60.0"
    cluster_domain: str = "cluster.local"
    # Default pod sizes (Kubernetes quantities), for what a ModelDeployment's spec.resources
    # leaves unset. GPU workers get the per-GPU sizes times accelerator.count; CPU-only workers
    # get the cpu_worker_* sizes.
    cpu_per_gpu: str = "8"
    memory_per_gpu: str = "64Gi"
    cpu_worker_cpu: str = "4"
    cpu_worker_memory: str = "16Gi"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    # The Ray autoscaler sidecar of each head pod (it only talks to the API server).
    autoscaler_cpu: str = "200m"
    autoscaler_memory: str = "512Mi"
    # Where serving pods may go beyond what residency and the accelerator decide: a platform's
    # dedicated node pools (their taints tolerated, their labels selected). Both can only add
    # constraints or permissions on top of residency's required node affinity, never lift it.
    pod_tolerations: tuple[dict[str, Any], ...] = ()
    pod_node_selector: tuple[tuple[str, str], ...] = ()
    # OTLP/HTTP endpoint that the serving app sends its request spans to, e.g.
    # http://otel-collector.observability:4318; None: the serving app exports no spans.
    otlp_endpoint: str | None = None


IDLE_WORKER_TIMEOUT_S = 60


def engine_config_hash(args: ServingArgs) -> str:
    """A digest of what the engines load: model, revision, adapters, engine arguments and
    accelerator. It annotates the Ray pod templates, so a change of any of these changes the
    RayCluster spec and KubeRay's NewCluster upgrade serves it from a new cluster, the old one
    serving until the new one runs (zero downtime). Scaling and API-key changes are left out:
    Serve applies them in place, without restarting an engine."""
    engine = args.to_wire()
    loaded = {key: engine.get(key) for key in ("model", "adapters", "engine", "accelerator")}
    return hashlib.sha256(json.dumps(loaded, sort_keys=True).encode()).hexdigest()[:16]


def _template_metadata(md: ModelDeployment, args: ServingArgs) -> dict[str, Any]:
    return {
        "labels": labels(md),
        "annotations": {ENGINE_CONFIG_ANNOTATION: engine_config_hash(args)},
    }


def labels(md: ModelDeployment) -> dict[str, str]:
    return {
        NAME_LABEL: "tramontane-serving",
        INSTANCE_LABEL: md.name,
        MANAGED_BY_LABEL: "tramontane",
        PART_OF_LABEL: "tramontane",
        DEPLOYMENT_LABEL: md.name,
        TENANT_LABEL: md.namespace,
    }


def _metadata(md: ModelDeployment, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": md.namespace,
        "labels": labels(md),
        "ownerReferences": [owner_reference(md)],
    }


def restricted_container_security() -> dict[str, Any]:
    """Pod Security Standard `restricted` for a container."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security() -> dict[str, Any]:
    # The Ray images run as uid 1000 ("ray").
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def serve_config(md: ModelDeployment, args: ServingArgs | None = None) -> dict[str, Any]:
    """The Ray Serve config (serveConfigV2) that runs tramontane.serving for this deployment.

    Autoscaling goes in the engine deployment's override, not in the application's args, so that
    a scaling change is applied in place (see ServingArgs.autoscaling)."""
    args = args or ServingArgs.from_model_deployment(md)
    application: dict[str, Any] = {
        "name": md.name,
        "route_prefix": "/",
        "import_path": ServingArgs.IMPORT_PATH,
        "args": args.model_copy(update={"autoscaling": None}).to_wire(),
    }
    if args.autoscaling is not None:
        application["deployments"] = [
            {
                "name": engine_deployment_name(args.model.served_name),
                "autoscaling_config": args.autoscaling.serve_config(),
            }
        ]
    return {
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},  # noqa: S104 (in-pod listener)
        "applications": [application],
    }


_QUANTITY = re.compile(r"^(?P<number>[0-9]*\.?[0-9]+)(?P<suffix>m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")


def scaled_quantity(quantity: str, factor: int) -> str:
    """`quantity` times `factor`, in the same unit: ("500m", 4) → "2000m", ("64Gi", 2) → "128Gi"."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a plain Kubernetes quantity: {quantity!r}")
    number = Decimal(match["number"]) * factor
    return f"{number.normalize():f}{match['suffix'] or ''}"


_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def quantity_value(quantity: str) -> Decimal | None:
    """A plain quantity as a number ("250m" → 0.25, "6Gi" → 6442450944), None if it is not one."""
    match = _QUANTITY.match(quantity)
    if match is None:
        return None
    suffix = match["suffix"] or ""
    if suffix == "m":
        return Decimal(match["number"]) / 1000
    return Decimal(match["number"]) * (_BINARY_SUFFIXES.get(suffix) or _DECIMAL_SUFFIXES[suffix])


def quantity_bytes(quantity: str) -> int:
    """A memory quantity in bytes: "6Gi" → 6442450944, "512M" → 512000000."""
    value = quantity_value(quantity)
    if value is None or quantity.endswith("m"):
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(value)


# Share of a CPU worker's memory given to vLLM's KV cache; the rest holds the weights, activations
# and the Ray worker. vLLM's CPU build would otherwise size it from the machine's memory, not the
# pod's limit, and the kernel would kill the pod.
CPU_KV_CACHE_SHARE = Decimal("0.25")


def cpu_engine_env(worker_memory: str) -> list[dict[str, Any]]:
    """The environment vLLM's CPU build needs in a worker pod (GPU workers need none)."""
    kv_cache_gib = max(1, int(quantity_bytes(worker_memory) * CPU_KV_CACHE_SHARE) // 2**30)
    return [
        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(kv_cache_gib)},
        # vLLM's CPU sampler (temperature > 0) goes through torch.compile, whose CPU backend
        # builds C++ at run time: the serving image has no compiler (nor should it), and the
        # first sampled request killed the engine (EngineDeadError: InvalidCxxCompiler). The
        # model itself already runs eagerly on CPU (enforce_eager).
        {"name": "TORCH_COMPILE_DISABLE", "value": "1"},
    ]


def quantity_cores(quantity: str) -> Decimal:
    """A CPU quantity in cores: "250m" → 0.25, "2" → 2."""
    value = quantity_value(quantity)
    if value is None or (quantity[-1].isalpha() and not quantity.endswith("m")):
        raise ValueError(f"not a CPU quantity: {quantity!r}")
    return value


# The CPU the Ray head may burst to when its request is lower (see _head_resources).
HEAD_CPU_CEILING = "500m"


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    """Requests = limits (Guaranteed QoS): a vLLM engine sizes itself from what it was given."""
    amounts: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits = dict(amounts)
    if gpus:
        amounts[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    return {"requests": amounts, "limits": limits}


def _head_resources(cpu: str, memory: str) -> dict[str, Any]:
    """The Ray head: `cpu` is reserved, and it may burst to HEAD_CPU_CEILING (if higher).

    Its CPU is needed at start-up more than in steady state: the head starts a dozen Ray
    processes at once, and with its limit at a 250m request the raylet gave up waiting for the
    dashboard agent (80 s) on a busy node, so the head crash-looped. A ceiling of a whole CPU was
    too much the other way: under load the head's Serve proxy took it, and on a 2-core node the
    API server and the kubelet starved (probes timed out, the node went NotReady). Memory stays
    capped at what was asked for (a memory burst cannot be taken back).
    """
    higher = quantity_cores(cpu) >= quantity_cores(HEAD_CPU_CEILING)
    return {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu if higher else HEAD_CPU_CEILING, "memory": memory},
    }


def _tracing_env(options: RenderOptions) -> list[dict[str, Any]]:
    """The standard OTEL_* variables: every Ray process of the pod inherits them, the serving
    app's replicas included (tramontane.serving.tracing reads them)."""
    if not options.otlp_endpoint:
        return []
    return [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": options.otlp_endpoint},
        {"name": "OTEL_SERVICE_NAME", "value": SERVING_SERVICE_NAME},
    ]


def _container(
    name: str,
    options: RenderOptions,
    resources: dict[str, Any],
    ports: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    *,
    engine_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "image": options.serving_image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        "ports": ports,
        "securityContext": restricted_container_security(),
        "env": [
            {"name": "RAY_SERVE_ENABLE_JSON_LOGGING", "value": "1"},
            # Ray 2.60 turns its token authentication on by default, and KubeRay v1.5 has no way
            # to hand the token to its dashboard calls (serve config deploys, health checks).
            # The dashboard is reachable only inside the tenant's namespace (NetworkPolicies).
            {"name": "RAY_AUTH_MODE", "value": "disabled"},
            # The serving topology (HAProxy ingress, the engine's replica serving HTTP itself).
            *({"name": name, "value": value} for name, value in RAY_SERVE_ENV.items()),
            *_tracing_env(options),
            *(engine_env or []),
        ],
        "volumeMounts": mounts,
    }


def api_keys_secret_name(md: ModelDeployment) -> str:
    """The tenant's Secret of API keys for this deployment (one entry per key)."""
    return f"{md.name}-api-keys"


def model_claims(md: ModelDeployment) -> list[str]:
    """PersistentVolumeClaims named by pvc:// URIs of the model and its adapters, in order."""
    uris = [md.spec.model.uri, *(adapter.uri for adapter in md.spec.adapters)]
    claims: list[str] = []
    for uri in uris:
        if uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").partition("/")[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def _volumes(md: ModelDeployment) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of the serving pods: the API keys and the model claims, read-only."""
    volumes: list[dict[str, Any]] = [
        {
            "name": "api-keys",
            # Optional: without the Secret the pods still start and refuse every request (401),
            # which says more than pods stuck in ContainerCreating.
            "secret": {
                "secretName": api_keys_secret_name(md),
                "optional": True,
                "defaultMode": 0o440,
            },
        }
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "api-keys", "mountPath": API_KEYS_MOUNT_PATH, "readOnly": True}
    ]
    for index, claim in enumerate(model_claims(md)):
        name = f"models-{index}"
        volumes.append(
            {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": name, "mountPath": f"{MODEL_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def _port(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "containerPort": port, "protocol": "TCP"}


def _head_group(
    md: ModelDeployment,
    options: RenderOptions,
    placement: list[dict[str, Any]],
    args: ServingArgs,
) -> dict[str, Any]:
    volumes, mounts = _volumes(md)
    head = md.spec.resources.head
    container = _container(
        "ray-head",
        options,
        _head_resources(head.cpu or options.head_cpu, head.memory or options.head_memory),
        [
            _port("gcs", 6379),
            _port("dashboard", 8265),
            _port("client", 10001),
            _port("serve", SERVE_PORT),
            _port("metrics", METRICS_PORT),
        ],
        mounts,
    )
    return {
        "serviceType": "ClusterIP",
        # The head schedules no model replicas: it runs GCS, the Serve controller, the proxy and
        # the ingress (which asks for no CPU). With no logical CPU or GPU to offer, an engine's
        # placement group ({"CPU": 1, ...}) can only land on a worker, sized for it.
        "rayStartParams": {
            "num-cpus": "0",
            "num-gpus": "0",
            "dashboard-host": "0.0.0.0",  # noqa: S104 (in-pod listener)
        },
        "template": {
            "metadata": _template_metadata(md, args),
            "spec": {
                "securityContext": restricted_pod_security(),
                "containers": [container],
                "volumes": volumes,
                **_placement_constraints(options, [], placement),
            },
        },
    }


def _required_affinity(requirements: list[dict[str, Any]]) -> dict[str, Any]:
    """Required node affinity: one term, all requirements ANDed."""
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": requirements}]
            }
        }
    }


def _placement_constraints(
    options: RenderOptions, tolerations: list[dict[str, Any]], requirements: list[dict[str, Any]]
) -> dict[str, Any]:
    """tolerations, nodeSelector and the required node affinity of a serving pod."""
    constraints: dict[str, Any] = {}
    all_tolerations = [*tolerations, *options.pod_tolerations]
    if all_tolerations:
        constraints["tolerations"] = all_tolerations
    if options.pod_node_selector:
        constraints["nodeSelector"] = dict(options.pod_node_selector)
    if requirements:
        constraints["affinity"] = _required_affinity(requirements)
    return constraints


def _gpu_requirement(accelerator: AcceleratorType) -> dict[str, Any]:
    return {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(GPU_PRODUCTS[accelerator])}


def _worker_group(
    md: ModelDeployment,
    options: RenderOptions,
    placement: list[dict[str, Any]],
    args: ServingArgs,
) -> dict[str, Any]:
    spec = md.spec
    gpus = spec.accelerator.gpus
    worker = spec.resources.worker
    if gpus:
        default_cpu = scaled_quantity(options.cpu_per_gpu, gpus)
        default_memory = scaled_quantity(options.memory_per_gpu, gpus)
    else:
        default_cpu, default_memory = options.cpu_worker_cpu, options.cpu_worker_memory
    memory = worker.memory or default_memory
    resources = _resources(worker.cpu or default_cpu, memory, gpus)
    volumes, mounts = _volumes(md)
    pod_spec: dict[str, Any] = {
        "securityContext": restricted_pod_security(),
        "containers": [
            _container(
                "ray-worker",
                options,
                resources,
                [_port("serve", SERVE_PORT), _port("metrics", METRICS_PORT)],
                mounts,
                engine_env=[] if gpus else cpu_engine_env(memory),
            )
        ],
        "volumes": volumes,
    }
    gpu_tolerations = (
        [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}] if gpus else []
    )
    requirements = [_gpu_requirement(spec.accelerator.type)] if gpus else []
    pod_spec |= _placement_constraints(options, gpu_tolerations, requirements + placement)
    return {
        "groupName": spec.accelerator.type.value.lower(),
        # One Ray worker pod per serving replica: a replica's engine uses all of its GPUs.
        "replicas": spec.desired_replicas,
        "minReplicas": spec.scaling.min_replicas,
        "maxReplicas": spec.scaling.max_replicas,
        "numOfHosts": 1,
        "rayStartParams": {},
        "template": {"metadata": _template_metadata(md, args), "spec": pod_spec},
    }


def render_rayservice(
    md: ModelDeployment,
    options: RenderOptions,
    args: ServingArgs | None = None,
    placement: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`placement`: node-selector requirements every Ray pod must meet (residency regions)."""
    placement = placement or []
    args = args or ServingArgs.from_model_deployment(md)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(md, md.name),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(md, args), sort_keys=False),
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterConfig": {
                "rayVersion": options.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    # Serve's downscale delay decides when a replica goes; its worker pod, idle
                    # from then on, goes this much later. A constant: a value derived from the
                    # spec would make a scaling change rebuild the cluster (KubeRay hashes this).
                    "idleTimeoutSeconds": IDLE_WORKER_TIMEOUT_S,
                    "securityContext": restricted_container_security(),
                    "resources": _resources(options.autoscaler_cpu, options.autoscaler_memory, 0),
                },
                "headGroupSpec": _head_group(md, options, placement, args),
                "workerGroupSpecs": [_worker_group(md, options, placement, args)],
            },
        },
    }


def worker_bounds_patch(
    rayservice: dict[str, Any], raycluster: dict[str, Any]
) -> list[dict[str, Any]]:
    """JSON-patch operations that give a running RayCluster the worker bounds (min and max
    replicas) of the RayService, or [] when they match.

    KubeRay leaves a running cluster alone when its spec differs from the RayService's only in
    replicas and their bounds (they are out of its hash, so that autoscaling does not rebuild the
    cluster), so a new scaling maximum would never reach the Ray autoscaler. `replicas` is the
    autoscaler's and is left alone. A `test` of each group's name guards its index."""
    wanted = {
        group["groupName"]: group
        for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    operations: list[dict[str, Any]] = []
    for index, group in enumerate(raycluster.get("spec", {}).get("workerGroupSpecs", [])):
        goal = wanted.get(group.get("groupName"))
        if goal is None:
            continue
        changes = [
            {"op": "replace", "path": f"/spec/workerGroupSpecs/{index}/{field}",
             "value": goal[field]}
            for field in ("minReplicas", "maxReplicas")
            if group.get(field) != goal[field]
        ]  # fmt: skip
        if changes:
            path = f"/spec/workerGroupSpecs/{index}/groupName"
            operations += [{"op": "test", "path": path, "value": group["groupName"]}, *changes]
    return operations


def render_podmonitor(md: ModelDeployment) -> dict[str, Any]:
    """prometheus-operator PodMonitor for the Ray and vLLM metrics of this deployment's pods."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(md, md.name),
        "spec": {
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: md.name}},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def serve_service_name(md: ModelDeployment) -> str:
    """KubeRay's Service in front of the Serve proxies (it follows cluster upgrades)."""
    return f"{md.name}-serve-svc"


def endpoint(md: ModelDeployment, options: RenderOptions) -> str:
    host = f"{serve_service_name(md)}.{md.namespace}.svc.{options.cluster_domain}"
    return f"http://{host}:{SERVE_PORT}/v1"


def pod_selector(md: ModelDeployment) -> str:
    return f"{DEPLOYMENT_LABEL}={md.name},{RAY_NODE_TYPE_LABEL}=worker"


def render_children(
    md: ModelDeployment, options: RenderOptions, placement: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Every object the operator keeps in place for one ModelDeployment."""
    return [render_rayservice(md, options, placement=placement), render_podmonitor(md)]
