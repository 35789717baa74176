"""The real API server enforces the ModelDeployment CRD: schema, CEL and the scale subresource.

Every invalid case starts from the valid sample (config/samples/modeldeployment.yaml) with exactly
one thing broken, and must be refused with an error that names the offending field and the rule, so
a tenant knows what to fix. Nothing reaches the operator: the object is never stored.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Kubectl, KubectlError

CRD_NAME = "modeldeployments.tramontane.dev"
NAME = "llama"

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def crds_installed(cluster: Kubectl, repo_root: Path) -> Kubectl:
    """The CRDs of this checkout, applied and Established (re-applied even if present: they may
    be an older version)."""
    crds = str(repo_root / "crds")
    cluster.run("apply", "--server-side", "--force-conflicts", "-f", crds)
    cluster.run("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    return cluster


@pytest.fixture
def namespace(tenant_namespace: str) -> str:
    """Valid ModelDeployments must pass the webhook too, which wants a tenant's namespace."""
    return tenant_namespace


@pytest.fixture(scope="session")
def sample(repo_root: Path) -> Manifest:
    manifest: Manifest = yaml.safe_load(
        (repo_root / "config" / "samples" / "modeldeployment.yaml").read_text()
    )
    return manifest


def _base(sample: Manifest, namespace: str) -> Manifest:
    manifest = copy.deepcopy(sample)
    manifest["metadata"] = {"name": NAME, "namespace": namespace}
    return manifest


def _walk(manifest: Manifest, path: str) -> tuple[Any, str | int]:
    """The container of the dotted `path` (numbers index lists) and the last key."""
    *parents, last = path.split(".")
    node: Any = manifest
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    return node, int(last) if last.isdigit() else last


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        node[key] = value

    return mutate


def _delete(path: str) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        del node[key]

    return mutate


def _update(path: str, **values: Any) -> Callable[[Manifest], None]:
    """Set several fields of the object at `path` at once (e.g. min and max replicas)."""

    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        node[key].update(values)

    return mutate


def _all(*mutations: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def mutate(manifest: Manifest) -> None:
        for mutation in mutations:
            mutation(manifest)

    return mutate


@dataclass(frozen=True)
class Invalid:
    id: str
    mutate: Callable[[Manifest], None]
    field: str  # the path the API server must blame
    message: str  # and (part of) the rule or message it must give


SHOULD_MATCH = "in body should match"
CPU = {"type": "CPU"}

INVALID = [
    Invalid("missing-model", _delete("spec.model"), "spec.model", "Required value"),
    Invalid("missing-model-uri", _delete("spec.model.uri"), "spec.model.uri", "Required value"),
    Invalid(
        "uri-ftp-scheme",
        _set("spec.model.uri", "ftp://models.example.com/llama"),
        "spec.model.uri",
        SHOULD_MATCH,
    ),
    Invalid(
        "uri-s3-without-bucket", _set("spec.model.uri", "s3://"), "spec.model.uri", SHOULD_MATCH
    ),
    Invalid(
        "accelerator-t4",
        _set("spec.accelerator.type", "T4"),
        "spec.accelerator.type",
        'Unsupported value: "T4"',
    ),
    Invalid(
        "h100-count-3",
        _set("spec.accelerator.count", 3),
        "spec.accelerator.count",
        "accelerator.count must be 1, 2, 4 or 8 for GPU accelerators and 0 for CPU",
    ),
    Invalid(
        "h100-count-0",
        _set("spec.accelerator.count", 0),
        "spec.accelerator.count",
        "accelerator.count must be 1, 2, 4 or 8 for GPU accelerators and 0 for CPU",
    ),
    Invalid(
        "cpu-count-2",
        _set("spec.accelerator", {**CPU, "count": 2}),
        "spec.accelerator.count",
        "accelerator.count must be 1, 2, 4 or 8 for GPU accelerators and 0 for CPU",
    ),
    Invalid(
        "min-above-max",
        _update("spec.scaling", minReplicas=5, maxReplicas=4),
        "spec.scaling.minReplicas",
        "scaling.minReplicas must be less than or equal to scaling.maxReplicas",
    ),
    Invalid(
        "max-replicas-0",
        _update("spec.scaling", minReplicas=0, maxReplicas=0),
        "spec.scaling.maxReplicas",
        "should be greater than or equal to 1",
    ),
    Invalid(
        "replicas-above-max",
        _all(_set("spec.replicas", 5), _update("spec.scaling", minReplicas=1, maxReplicas=2)),
        "spec.replicas",
        "replicas must be within scaling.minReplicas and scaling.maxReplicas",
    ),
    Invalid(
        "replicas-below-min",
        _all(_set("spec.replicas", 1), _update("spec.scaling", minReplicas=2, maxReplicas=4)),
        "spec.replicas",
        "replicas must be within scaling.minReplicas and scaling.maxReplicas",
    ),
    Invalid(
        "gpu-memory-utilization-1.5",
        _set("spec.engine.gpuMemoryUtilization", 1.5),
        "spec.engine.gpuMemoryUtilization",
        "should be less than or equal to 0.98",
    ),
    Invalid(
        "tensor-parallel-above-count",
        _all(_set("spec.engine.tensorParallelSize", 4), _set("spec.accelerator.count", 2)),
        "spec.engine.tensorParallelSize",
        "engine.tensorParallelSize must not exceed accelerator.count (1 on CPU)",
    ),
    Invalid(
        "tensor-parallel-above-default-count",
        _all(_set("spec.engine.tensorParallelSize", 2), _delete("spec.accelerator.count")),
        "spec.engine.tensorParallelSize",
        "engine.tensorParallelSize must not exceed accelerator.count (1 on CPU)",
    ),
    Invalid(
        "tensor-parallel-on-cpu",
        _all(_set("spec.engine.tensorParallelSize", 2), _set("spec.accelerator", CPU)),
        "spec.engine.tensorParallelSize",
        "engine.tensorParallelSize must not exceed accelerator.count (1 on CPU)",
    ),
    Invalid(
        "dtype-int3",
        _set("spec.engine.dtype", "int3"),
        "spec.engine.dtype",
        'Unsupported value: "int3"',
    ),
    Invalid(
        "quantization-magic",
        _set("spec.engine.quantization", "magic"),
        "spec.engine.quantization",
        'Unsupported value: "magic"',
    ),
    Invalid(
        "max-model-len-8",
        _set("spec.engine.maxModelLen", 8),
        "spec.engine.maxModelLen",
        "should be greater than or equal to 16",
    ),
    Invalid(
        "extra-arg-not-a-string",
        _set("spec.engine.extraArgs", {"max_num_batched_tokens": 8192}),
        "spec.engine.extraArgs.max_num_batched_tokens",
        "must be of type string",
    ),
    Invalid(
        "duplicate-adapter-names",
        lambda m: m["spec"]["adapters"].append(
            {"name": m["spec"]["adapters"][0]["name"], "uri": "s3://acme-eu-models/adapters/x"}
        ),
        "spec.adapters[2]",
        'Duplicate value: {"name":"finance-reports"}',
    ),
    Invalid(
        "adapter-uri-http",
        _set("spec.adapters.0.uri", "http://example.com/adapter"),
        "spec.adapters[0].uri",
        SHOULD_MATCH,
    ),
    Invalid(
        "adapter-name-uppercase",
        _set("spec.adapters.0.name", "Finance"),
        "spec.adapters[0].name",
        SHOULD_MATCH,
    ),
    Invalid(
        "served-name-with-spaces",
        _set("spec.model.servedName", "llama 3.1 instruct"),
        "spec.model.servedName",
        SHOULD_MATCH,
    ),
    Invalid(
        "unknown-spec-field",
        _set("spec.gpus", 8),
        "spec.gpus",
        "strict decoding error: unknown field",
    ),
    Invalid(
        "head-cpu-not-a-quantity",
        _set("spec.resources", {"head": {"cpu": "two"}}),
        "spec.resources.head.cpu",
        SHOULD_MATCH,
    ),
    Invalid(
        "worker-memory-zero",
        _set("spec.resources", {"worker": {"memory": "0Gi"}}),
        "spec.resources.worker.memory",
        "memory must be a quantity greater than zero",
    ),
    Invalid(
        "worker-cpu-negative",
        _set("spec.resources", {"worker": {"cpu": "-1"}}),
        "spec.resources.worker.cpu",
        SHOULD_MATCH,
    ),
    # --- a hostile tenant: engine arguments that load code or reach past residency ---------
    *(
        Invalid(
            f"extra-arg-{name.replace('_', '-')}",
            _set("spec.engine.extraArgs", {name: value}),
            "spec.engine.extraArgs",
            "engine.extraArgs: only these vLLM arguments are allowed",
        )
        for name, value in [
            ("tokenizer", "hf://evil-org/tokenizer"),
            ("trust_remote_code", "true"),
            ("speculative_config", '{"model": "https://attacker.example/draft"}'),
            ("otlp_traces_endpoint", "https://collector.attacker.example:4317"),
            ("kv_transfer_config", '{"kv_connector": "x", "remote_url": "tcp://1.2.3.4:1"}'),
            ("download_dir", "/mnt/attacker-volume"),
            ("worker_extension_cls", "os.system"),
            ("hf_overrides", '{"auto_map": {"AutoModel": "evil/model--Model"}}'),
            ("generation_config", "/etc"),
            ("model", "hf://meta-llama/Llama-3.1-405B"),
            ("load_format", "tensorizer"),
            ("enable_log_requests", "true"),
        ]
    ),
    Invalid(
        "extra-arg-seed-negative",
        _set("spec.engine.extraArgs", {"seed": "-1"}),
        "spec.engine.extraArgs",
        "engine.extraArgs.seed must be a whole number from 0 to 2147483647",
    ),
    Invalid(
        "extra-arg-batched-tokens-zero",
        _set("spec.engine.extraArgs", {"max_num_batched_tokens": "0"}),
        "spec.engine.extraArgs",
        "engine.extraArgs.max_num_batched_tokens must be a whole number from 1 to",
    ),
    Invalid(
        "extra-arg-kv-cache-dtype-unknown",
        _set("spec.engine.extraArgs", {"kv_cache_dtype": "int9"}),
        "spec.engine.extraArgs",
        "engine.extraArgs.kv_cache_dtype must be one of auto, float16",
    ),
    Invalid(
        "extra-arg-bool-not-a-bool",
        _set("spec.engine.extraArgs", {"enforce_eager": "yes"}),
        "spec.engine.extraArgs",
        "engine.extraArgs.enforce_eager must be true or false",
    ),
    Invalid(
        "extra-arg-value-too-long",
        _set("spec.engine.extraArgs", {"seed": "1" * 65}),
        "spec.engine.extraArgs.seed",
        "may not be more than 64 bytes",
    ),
    # --- a hostile tenant: paths that step out of what the policy matched -------------------
    Invalid(
        "model-uri-dot-dot",
        _set("spec.model.uri", "s3://acme-eu-models/meta-llama/../../other-bucket"),
        "spec.model.uri",
        "uri must be a normal path: no '.' or '..' segments",
    ),
    Invalid(
        "model-uri-ends-in-dot-dot",
        _set("spec.model.uri", "s3://acme-eu-models/meta-llama/.."),
        "spec.model.uri",
        "uri must be a normal path",
    ),
    Invalid(
        "adapter-uri-dot",
        _set("spec.adapters.0.uri", "s3://acme-eu-models/adapters/./x"),
        "spec.adapters[0].uri",
        "uri must be a normal path",
    ),
    Invalid(
        "adapter-uri-empty-segment",
        _set("spec.adapters.1.uri", "s3://acme-eu-models//adapters/x"),
        "spec.adapters[1].uri",
        "uri must be a normal path",
    ),
    Invalid(
        "model-uri-trailing-slash",
        _set("spec.model.uri", "s3://acme-eu-models/meta-llama/"),
        "spec.model.uri",
        "uri must be a normal path",
    ),
    Invalid(
        "name-longer-than-40",
        _set("metadata.name", "llama-3-1-8b-instruct-finance-reports-eu-west"),
        "metadata.name",
        "metadata.name must be at most 40 characters",
    ),
]


def _names_field(stderr: str, field: str) -> bool:
    """The error blames exactly `field`: `spec.x.y: ...` or `unknown field "spec.x.y"`, and not
    merely a longer path that contains it."""
    return re.search(rf'(?<![\w.\[\]]){re.escape(field)}(: |")', stderr) is not None


def test_field_matching_is_exact() -> None:
    assert _names_field("invalid: spec.model: Required value", "spec.model")
    assert _names_field('unknown field "spec.gpus"', "spec.gpus")
    assert not _names_field("invalid: spec.model.uri: Required value", "spec.model")
    assert not _names_field("invalid: spec.model.uri: Required value", "model.uri")
    assert not _names_field("* <nil>: Invalid value: metadata.name must be", "metadata.name")


def _stored(cluster: Kubectl, namespace: str) -> str:
    return cluster.run("get", "md", "-n", namespace, "-o", "name").strip()


def test_the_base_sample_is_accepted(
    crds_installed: Kubectl, namespace: str, sample: Manifest
) -> None:
    """The control for every invalid case: unbroken, the same manifest is stored."""
    crds_installed.create(_base(sample, namespace))
    assert _stored(crds_installed, namespace) == f"modeldeployment.tramontane.dev/{NAME}"
    stored = crds_installed.json("get", "md", NAME, "-n", namespace)
    # Server-side defaults from the CRD schema are filled in.
    assert stored["spec"]["engine"]["tensorParallelSize"] == 1
    assert stored["spec"]["scaling"]["upscaleDelaySeconds"] == 30


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_modeldeployment_is_rejected(
    crds_installed: Kubectl, namespace: str, sample: Manifest, case: Invalid
) -> None:
    manifest = _base(sample, namespace)
    case.mutate(manifest)
    assert manifest != _base(sample, namespace), "the case must change the sample"

    result = crds_installed.create(manifest, check=False)

    assert result.returncode != 0, f"{case.id} was accepted:\n{result.stdout}"
    assert _names_field(result.stderr, case.field), (
        f"error does not name {case.field}:\n{result.stderr}"
    )
    assert case.message in result.stderr, f"error does not say {case.message!r}:\n{result.stderr}"
    assert _stored(crds_installed, namespace) == "", "a rejected ModelDeployment was stored"


def test_enough_distinct_invalid_cases() -> None:
    assert len(INVALID) >= 15
    assert len({c.id for c in INVALID}) == len(INVALID)


# --- update-time rules ------------------------------------------------------------------------


def _create(cluster: Kubectl, sample: Manifest, namespace: str) -> Manifest:
    cluster.create(_base(sample, namespace))
    stored: Manifest = cluster.json("get", "md", NAME, "-n", namespace)
    return stored


def _patch(cluster: Kubectl, namespace: str, patch: str, kind: str = "merge") -> str:
    return cluster.run("patch", f"md/{NAME}", "-n", namespace, f"--type={kind}", "-p", patch)


def test_accelerator_type_is_immutable(
    crds_installed: Kubectl, namespace: str, sample: Manifest
) -> None:
    before = _create(crds_installed, sample, namespace)
    assert before["spec"]["accelerator"]["type"] == "H100"

    with pytest.raises(KubectlError) as rejected:
        _patch(crds_installed, namespace, '{"spec": {"accelerator": {"type": "A100"}}}')
    assert _names_field(rejected.value.stderr, "spec.accelerator.type"), rejected.value.stderr
    assert "accelerator.type is immutable" in rejected.value.stderr

    after = crds_installed.json("get", "md", NAME, "-n", namespace)
    assert after["spec"]["accelerator"]["type"] == "H100"
    assert after["metadata"]["generation"] == before["metadata"]["generation"]

    # Control: the rest of the accelerator can change (it is the type alone that is frozen).
    _patch(crds_installed, namespace, '{"spec": {"accelerator": {"count": 2}}}')
    after = crds_installed.json("get", "md", NAME, "-n", namespace)
    assert after["spec"]["accelerator"] == {"type": "H100", "count": 2}


def test_served_name_is_immutable(
    crds_installed: Kubectl, namespace: str, sample: Manifest
) -> None:
    before = _create(crds_installed, sample, namespace)
    served = before["spec"]["model"]["servedName"]

    with pytest.raises(KubectlError) as renamed:
        _patch(crds_installed, namespace, '{"spec": {"model": {"servedName": "llama-renamed"}}}')
    assert _names_field(renamed.value.stderr, "spec.model.servedName"), renamed.value.stderr
    assert "model.servedName is immutable" in renamed.value.stderr

    # Dropping it would silently change the name clients call (to metadata.name): refused too.
    with pytest.raises(KubectlError) as dropped:
        _patch(
            crds_installed,
            namespace,
            '[{"op": "remove", "path": "/spec/model/servedName"}]',
            "json",
        )
    assert "model.servedName is immutable" in dropped.value.stderr

    assert (
        crds_installed.json("get", "md", NAME, "-n", namespace)["spec"]["model"]["servedName"]
        == served
    )

    # Control: other fields of the model, such as the pinned revision, may change.
    _patch(crds_installed, namespace, '{"spec": {"model": {"revision": "v2"}}}')
    model = crds_installed.json("get", "md", NAME, "-n", namespace)["spec"]["model"]
    assert model["revision"] == "v2"
    assert model["servedName"] == served


@pytest.mark.parametrize("replicas", [0, 5, 64])
def test_scale_outside_the_scaling_bounds_is_rejected(
    crds_installed: Kubectl, namespace: str, sample: Manifest, replicas: int
) -> None:
    before = _create(crds_installed, sample, namespace)
    assert (before["spec"]["scaling"]["minReplicas"], before["spec"]["scaling"]["maxReplicas"]) == (
        1,
        4,
    )
    with pytest.raises(KubectlError) as rejected:
        crds_installed.run("scale", f"md/{NAME}", "-n", namespace, f"--replicas={replicas}")
    assert _names_field(rejected.value.stderr, "spec.replicas"), rejected.value.stderr
    assert "replicas must be within scaling.minReplicas and scaling.maxReplicas" in (
        rejected.value.stderr
    )
    assert "replicas" not in crds_installed.json("get", "md", NAME, "-n", namespace)["spec"]


def test_scale_within_the_scaling_bounds_sets_spec_replicas(
    crds_installed: Kubectl, namespace: str, sample: Manifest
) -> None:
    _create(crds_installed, sample, namespace)
    scale_url = (
        f"/apis/tramontane.dev/v1alpha1/namespaces/{namespace}/modeldeployments/{NAME}/scale"
    )
    for replicas in (3, 4, 1):  # inside, and both bounds (scaling is 1..4 in the sample)
        crds_installed.run("scale", f"md/{NAME}", "-n", namespace, f"--replicas={replicas}")
        spec = crds_installed.json("get", "md", NAME, "-n", namespace)["spec"]
        assert spec["replicas"] == replicas
        scale = json.loads(crds_installed.run("get", "--raw", scale_url))
        assert scale["kind"] == "Scale"
        assert scale["spec"]["replicas"] == replicas
