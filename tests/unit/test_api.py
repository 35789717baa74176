"""The tramontane.dev API models, their defaults and the CRD generated from them (no cluster)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tramontane.api.conditions import Condition, ConditionStatus, find, set_condition
from tramontane.api.crd import modeldeployment_crd
from tramontane.api.engine_args import ENGINE_ARGS
from tramontane.api.v1alpha1 import (
    Accelerator,
    AcceleratorType,
    DType,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelSource,
    Scaling,
)

URI = "s3://acme-eu-models/meta-llama/Llama-3.1-8B-Instruct"
SAMPLE = Path(__file__).resolve().parents[2] / "config" / "samples" / "modeldeployment.yaml"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _deployment(name: str = "llama", **spec: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"model": {"uri": URI}, **spec},
        }
    )


# --- defaults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accelerator", "gpus"),
    [
        ({}, 1),
        ({"type": "H100"}, 1),
        ({"type": "A100", "count": 4}, 4),
        ({"type": "H200", "count": 8}, 8),
        ({"type": "CPU"}, 0),
        ({"type": "CPU", "count": 0}, 0),
    ],
)
def test_effective_gpu_count(accelerator: dict[str, Any], gpus: int) -> None:
    assert Accelerator.model_validate(accelerator).gpus == gpus


def test_spec_defaults_fill_every_section() -> None:
    spec = _deployment().spec
    assert spec.accelerator.type is AcceleratorType.H100
    assert spec.accelerator.count is None
    assert spec.accelerator.gpus == 1
    assert spec.engine.tensor_parallel_size == 1
    assert spec.engine.gpu_memory_utilization == 0.9
    assert spec.engine.dtype is DType.AUTO
    assert spec.engine.enable_prefix_caching is True
    assert spec.scaling.min_replicas == 1
    assert spec.scaling.max_replicas == 1
    assert spec.adapters == []
    assert spec.replicas is None


@pytest.mark.parametrize(
    ("scaling", "replicas", "desired"),
    [
        ({}, None, 1),
        ({"minReplicas": 2, "maxReplicas": 6}, None, 2),
        ({"minReplicas": 0, "maxReplicas": 6}, None, 0),
        ({"minReplicas": 2, "maxReplicas": 6}, 5, 5),
        ({"minReplicas": 0, "maxReplicas": 6}, 0, 0),
    ],
)
def test_desired_replicas_defaults_to_min_replicas(
    scaling: dict[str, int], replicas: int | None, desired: int
) -> None:
    spec: dict[str, Any] = {"scaling": scaling}
    if replicas is not None:
        spec["replicas"] = replicas
    assert _deployment(**spec).spec.desired_replicas == desired


def test_served_name_falls_back_to_metadata_name() -> None:
    assert _deployment("llama-3-8b").served_name == "llama-3-8b"
    named = _deployment("llama-3-8b", model={"uri": URI, "servedName": "meta/llama-3.1"})
    assert named.served_name == "meta/llama-3.1"
    assert named.name == "llama-3-8b"


def test_models_use_camel_case_on_the_wire_and_reject_unknown_fields() -> None:
    scaling = Scaling.model_validate({"minReplicas": 2, "maxReplicas": 3})
    assert scaling.to_wire()["minReplicas"] == 2
    assert "min_replicas" not in scaling.to_wire()
    # Unset optional fields are left out, so they never become explicit nulls in a manifest.
    assert "count" not in Accelerator().to_wire()
    with pytest.raises(ValidationError, match="extra"):
        ModelSource.model_validate({"uri": URI, "weights": "x"})
    with pytest.raises(ValidationError, match="uri"):
        ModelSource.model_validate({"uri": "ftp://example.com/model"})


# --- parsing objects the API server returns ---------------------------------------------------


def _api_server_object() -> dict[str, Any]:
    """A ModelDeployment as `kubectl get -o json` shows it: defaults filled, server metadata."""
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": "llama-3-8b",
            "namespace": "team-finance",
            "uid": "0b7f0c43-6e0d-4b55-9b3a-3b8f5e0d1a2c",
            "resourceVersion": "48213",
            "generation": 3,
            "creationTimestamp": "2026-01-01T12:00:00Z",
            "labels": {"team": "finance"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"],
            "managedFields": [
                {
                    "manager": "kubectl",
                    "operation": "Apply",
                    "apiVersion": "tramontane.dev/v1alpha1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:model": {}}},
                }
            ],
        },
        "spec": {
            "model": {"uri": URI, "revision": "0e9e39f2"},
            "adapters": [{"name": "finance-reports", "uri": "s3://acme-eu-models/adapters/f"}],
            "engine": {
                "tensorParallelSize": 2,
                "gpuMemoryUtilization": 0.85,
                "dtype": "bfloat16",
                "quantization": "fp8",
                "enablePrefixCaching": False,
                "extraArgs": {"max_num_batched_tokens": "8192"},
            },
            "accelerator": {"type": "H100", "count": 2},
            "scaling": {
                "minReplicas": 1,
                "maxReplicas": 4,
                "targetOngoingRequests": 16,
                "upscaleDelaySeconds": 30,
                "downscaleDelaySeconds": 300,
            },
            "replicas": 3,
        },
        "status": {
            "observedGeneration": 2,
            "replicas": 2,
            "readyReplicas": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Scaling",
                    "message": "1/2 ready",
                    "lastTransitionTime": "2026-01-01T12:01:00Z",
                }
            ],
            "someFieldAFutureOperatorWrites": True,
        },
    }


def test_from_body_parses_an_api_server_object() -> None:
    md = ModelDeployment.from_body(_api_server_object())
    assert md.name == "llama-3-8b"
    assert md.namespace == "team-finance"
    assert md.generation == 3
    assert md.served_name == "llama-3-8b"
    assert md.spec.model.revision == "0e9e39f2"
    assert [a.name for a in md.spec.adapters] == ["finance-reports"]
    assert md.spec.engine.tensor_parallel_size == 2
    assert md.spec.engine.dtype is DType.BFLOAT16
    assert md.spec.engine.quantization is not None
    assert md.spec.engine.quantization.value == "fp8"
    assert md.spec.engine.enable_prefix_caching is False
    assert md.spec.engine.extra_args == {"max_num_batched_tokens": "8192"}
    assert md.spec.accelerator.gpus == 2
    assert md.spec.desired_replicas == 3
    # Status is the operator's output, not its input: unknown status fields do not break parsing.
    assert md.status is None
    # Server-managed metadata is kept as it is (the operator needs uid for owner references).
    assert md.metadata["uid"] == "0b7f0c43-6e0d-4b55-9b3a-3b8f5e0d1a2c"


def test_from_body_does_not_alias_the_callers_metadata() -> None:
    body = _api_server_object()
    md = ModelDeployment.from_body(body)
    md.metadata["labels"] = {}
    del md.metadata["finalizers"]
    assert body["metadata"]["labels"] == {"team": "finance"}
    assert body["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]


def test_from_body_rejects_an_invalid_spec() -> None:
    body = _api_server_object()
    body["spec"]["accelerator"]["type"] = "T4"
    with pytest.raises(ValidationError, match="accelerator"):
        ModelDeployment.from_body(body)


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://models/../../..",
        "pvc://models/tiny/..",
        "pvc://models/./tiny",
        "s3://acme-eu-models//meta-llama",
        "gs://acme-eu-models/meta-llama/",
    ],
)
def test_a_uri_that_is_not_a_normal_path_is_refused_for_the_model_and_adapters(uri: str) -> None:
    with pytest.raises(ValidationError, match="uri must be a normal path"):
        _deployment(model={"uri": uri})
    with pytest.raises(ValidationError, match="uri must be a normal path"):
        _deployment(adapters=[{"name": "a", "uri": uri}])


@pytest.mark.parametrize(
    "uri", ["s3://acme-eu-models/a..b/.cache/v1", "pvc://models/...weights", "pvc://models"]
)
def test_dots_inside_a_segment_are_not_path_steps(uri: str) -> None:
    assert _deployment(model={"uri": uri}).spec.model.uri == uri


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"trust_remote_code": "true"}, "engine.extraArgs.trust_remote_code is not an allowed"),
        ({"tokenizer": "hf://x/y"}, "engine.extraArgs.tokenizer is not an allowed"),
        ({"seed": "1e3"}, "engine.extraArgs.seed must be a whole number from 0 to 2147483647"),
        ({"cpu_offload_gb": "2048"}, "engine.extraArgs.cpu_offload_gb must be a decimal number"),
        ({"scheduling_policy": "lifo"}, "engine.extraArgs.scheduling_policy must be one of"),
    ],
)
def test_extra_args_outside_the_allow_list_or_their_type_are_refused_by_name(
    extra: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _deployment(engine={"extraArgs": extra})


def test_the_crd_checks_every_allowed_extra_arg_by_cel() -> None:
    extra_args = _crd_schema()["properties"]["spec"]["properties"]["engine"]["properties"][
        "extraArgs"
    ]
    messages = [rule["message"] for rule in _rules(extra_args)]
    assert messages[0].startswith("engine.extraArgs: only these vLLM arguments are allowed")
    for name in ENGINE_ARGS:
        assert any(m.startswith(f"engine.extraArgs.{name} ") for m in messages), name
    assert extra_args["additionalProperties"]["maxLength"] == 64


def test_the_sample_parses() -> None:
    md = ModelDeployment.from_body(yaml.safe_load(SAMPLE.read_text()))
    assert md.served_name == "llama-3.1-8b-instruct"
    assert md.spec.scaling.max_replicas == 4
    assert len(md.spec.adapters) == 2


# --- the generated CRD ----------------------------------------------------------------------


def _schema_nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path (property names are never mistaken for keywords)."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _schema_nodes(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_nodes(schema["additionalProperties"], f"{path}{{}}")


def _structural_violations(schema: dict[str, Any]) -> list[str]:
    problems = []
    for path, node in _schema_nodes(schema):
        for keyword in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "title"):
            if keyword in node:
                problems.append(f"{path or '<root>'}: has {keyword}")
        if node.get("additionalProperties") is False:
            problems.append(f"{path or '<root>'}: has additionalProperties: false")
        if "type" not in node:
            problems.append(f"{path or '<root>'}: has no type")
    return problems


def _undescribed(schema: dict[str, Any]) -> list[str]:
    """Properties (and the root) without a description; list items and map values are not
    properties of their own."""
    return [
        path or "<root>"
        for path, node in _schema_nodes(schema)
        if not path.endswith(("[]", "{}")) and not node.get("description")
    ]


def _crd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = modeldeployment_crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]
    return schema


def test_the_structure_checks_can_fail() -> None:
    """The checks below are only worth something if they see what they look for."""
    bad = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/A"},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}], "type": "string"},
            "c": {"type": "object", "title": "C", "additionalProperties": False},
            "title": {"type": "string", "description": "a property may be called title"},
            "d": {"type": "array", "items": {"type": "object", "properties": {"e": {}}}},
        },
    }
    assert _structural_violations(bad) == [
        ".a: has $ref",
        ".a: has no type",
        ".b: has anyOf",
        ".c: has title",
        ".c: has additionalProperties: false",
        ".d[].e: has no type",
    ]
    assert _undescribed(bad) == ["<root>", ".a", ".b", ".c", ".d", ".d[].e"]


def test_crd_schema_is_structural() -> None:
    crd = modeldeployment_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "modeldeployments.tramontane.dev"
    assert crd["spec"]["names"]["shortNames"] == ["md"]
    assert _structural_violations(_crd_schema()) == []


def test_crd_has_no_forbidden_keys_anywhere() -> None:
    """A blind walk of the whole manifest, in case something slipped in outside the schema."""

    def walk(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                inside_properties = path.endswith(".properties")
                if not inside_properties and key in {"$ref", "anyOf", "title"}:
                    yield f"{path}.{key}"
                if key == "additionalProperties" and value is False:
                    yield f"{path}.{key}"
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, f"{path}[{i}]")

    assert list(walk(modeldeployment_crd(), "")) == []


def test_every_spec_property_has_a_description() -> None:
    spec = _crd_schema()["properties"]["spec"]
    assert _undescribed(spec) == []
    # Sanity: the walk does reach deep fields.
    paths = {path for path, _ in _schema_nodes(spec)}
    assert {".model.uri", ".adapters[].name", ".engine.extraArgs{}", ".scaling.maxReplicas"} <= (
        paths
    )


def test_crd_carries_the_cel_rules_and_defaults() -> None:
    schema = _crd_schema()
    spec = schema["properties"]["spec"]
    messages = [v["message"] for _, node in _schema_nodes(schema) for v in _rules(node)]
    assert any("minReplicas must be less than or equal" in m for m in messages)
    assert any("tensorParallelSize must not exceed" in m for m in messages)
    assert any("accelerator.type is immutable" in m for m in messages)
    assert any("servedName is immutable" in m for m in messages)
    name_rule = next(v for v in _rules(schema) if "metadata.name" in v["message"])
    assert name_rule["fieldPath"] == ".metadata.name"
    # Whole-section defaults, so rules reading engine/accelerator/scaling always see them.
    assert spec["properties"]["scaling"]["default"]["maxReplicas"] == 1
    assert spec["properties"]["engine"]["default"]["tensorParallelSize"] == 1
    assert spec["properties"]["accelerator"]["default"] == {"type": "H100"}
    assert spec["required"] == ["model"]
    assert spec["properties"]["adapters"]["x-kubernetes-list-map-keys"] == ["name"]
    # Status is written by the operator only: no defaults there.
    status_defaults = [
        p for p, n in _schema_nodes(schema["properties"]["status"]) if "default" in n
    ]
    assert status_defaults == []


def _rules(node: dict[str, Any]) -> list[dict[str, str]]:
    rules: list[dict[str, str]] = node.get("x-kubernetes-validations", [])
    return rules


def test_scale_subresource_paths() -> None:
    version = modeldeployment_crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    # The paths point at fields that exist, with the types the scale subresource expects.
    schema = _crd_schema()["properties"]
    assert schema["spec"]["properties"]["replicas"]["type"] == "integer"
    assert schema["status"]["properties"]["replicas"]["type"] == "integer"
    assert schema["status"]["properties"]["selector"]["type"] == "string"


def test_printer_columns() -> None:
    columns = modeldeployment_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    by_name = {c["name"]: c for c in columns}
    assert {"Model", "Accelerator", "Replicas", "Ready", "Age"} <= set(by_name)
    assert by_name["Model"]["jsonPath"] == ".spec.model.uri"
    assert by_name["Accelerator"]["jsonPath"] == ".spec.accelerator.type"
    assert by_name["Replicas"]["jsonPath"] == ".status.replicas"
    assert by_name["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert by_name["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    # The default view (priority 0) keeps this order.
    default_view = [c["name"] for c in columns if not c.get("priority")]
    assert default_view == ["Model", "Accelerator", "Replicas", "Ready", "Age"]


def test_spec_model_matches_crd_property_names() -> None:
    """Every pydantic field of the spec is in the CRD under its camelCase name, and nothing else."""
    crd_props = set(_crd_schema()["properties"]["spec"]["properties"])
    model_props = {f.alias or n for n, f in ModelDeploymentSpec.model_fields.items()}
    assert crd_props == model_props
    assert (
        "tensorParallelSize"
        in _crd_schema()["properties"]["spec"]["properties"]["engine"]["properties"]
    )


# --- conditions -----------------------------------------------------------------------------


def _condition(status: str, at: datetime, reason: str = "Reconciled", **kw: Any) -> Condition:
    return Condition.model_validate(
        {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": at, **kw}
    )


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    old = _condition("True", T0, message="ready")
    later = T0 + timedelta(minutes=5)
    (updated,) = set_condition([old], _condition("True", later, reason="StillReady", message="ok"))
    assert updated.last_transition_time == T0
    # The rest of the condition is the new one.
    assert updated.reason == "StillReady"
    assert updated.message == "ok"


def test_set_condition_updates_transition_time_when_status_changes() -> None:
    old = _condition("True", T0)
    later = T0 + timedelta(minutes=5)
    (updated,) = set_condition([old], _condition("False", later, reason="WorkersLost"))
    assert updated.status is ConditionStatus.FALSE
    assert updated.last_transition_time == later
    assert updated.reason == "WorkersLost"


def test_set_condition_adds_new_types_and_leaves_others_alone() -> None:
    reconciled = Condition.model_validate(
        {
            "type": "Reconciled",
            "status": "True",
            "reason": "Applied",
            "lastTransitionTime": T0,
        }
    )
    later = T0 + timedelta(minutes=1)
    conditions = set_condition([reconciled], _condition("Unknown", later, reason="Starting"))
    assert [c.type for c in conditions] == ["Reconciled", "Ready"]
    assert conditions[0] is reconciled
    ready = find(conditions, "Ready")
    assert ready is not None
    assert ready.last_transition_time == later
    assert find(conditions, "Available") is None
    # Setting again replaces rather than appends.
    again = set_condition(conditions, _condition("True", later + timedelta(minutes=1)))
    assert [c.type for c in again] == ["Reconciled", "Ready"]
    assert again[1].status is ConditionStatus.TRUE
    assert again[1].last_transition_time == later + timedelta(minutes=1)
