"""CustomResourceDefinitions generated from the pydantic models (pure: no I/O).

Pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no anyOf
for optional fields, no `additionalProperties: false` beside `properties`, no titles. This module
turns one into the other and wraps it into a CRD with subresources and printer columns.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from tramontane.api.base import GROUP, VERSION
from tramontane.api.conditions import ConditionType
from tramontane.api.labels import PART_OF_LABEL
from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import ModelDeployment

_DROPPED_KEYS = {"title", "$defs"}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        # Keys beside $ref (description, default, CEL rules of the field) win over the target's.
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    if "anyOf" in schema:
        variants = [v for v in schema["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"only Optional[X] unions are supported, got {schema['anyOf']}")
        outer = {k: v for k, v in schema.items() if k != "anyOf"}
        schema = {**_resolve(variants[0], defs), **outer}
    if schema.get("default", 0) is None:
        del schema["default"]
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            result[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            result[key] = _resolve(value, defs)
        elif key == "additionalProperties":
            continue  # `false` is implied by a structural schema; pruning drops unknown fields
        else:
            result[key] = value
    return result


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema (camelCase) as a structural OpenAPI v3 schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _resolve(raw, raw.get("$defs", {}))


def _strip_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """Status is written by the operator only: defaults there would hide what it did not write."""
    schema = {k: v for k, v in schema.items() if k != "default"}
    if "properties" in schema:
        schema["properties"] = {k: _strip_defaults(v) for k, v in schema["properties"].items()}
    if "items" in schema:
        schema["items"] = _strip_defaults(schema["items"])
    return schema


def _object_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = structural_schema(model)
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "description": props["apiVersion"]["description"]}
    props["kind"] = {"type": "string", "description": props["kind"]["description"]}
    # Only metadata.name may be declared (and is, so that the name-length rule's fieldPath points
    # at it); the API server validates the rest of metadata itself.
    props["metadata"] = {"type": "object", "properties": {"name": {"type": "string"}}}
    if "status" in props:
        props["status"] = _strip_defaults(props["status"])
    schema["required"] = ["spec"]
    return schema


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    scope: str,
    schema: dict[str, Any],
    subresources: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {PART_OF_LABEL: "tramontane"},
        },
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["tramontane"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _condition_column(condition: ConditionType) -> dict[str, Any]:
    return {
        "name": condition.value,  # a plain str: YAML dumps no enums
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
    }


def modeldeployment_crd() -> dict[str, Any]:
    return _crd(
        kind=ModelDeployment.KIND,
        plural=ModelDeployment.PLURAL,
        short_names=["md"],
        scope="Namespaced",
        schema=_object_schema(ModelDeployment),
        subresources={
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
        columns=[
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
            {"name": "Accelerator", "type": "string", "jsonPath": ".spec.accelerator.type"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
            {"name": "Ready-Replicas", "type": "integer", "jsonPath": ".status.readyReplicas",
             "priority": 1},
            _condition_column(ConditionType.READY),
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )  # fmt: skip


def residencypolicy_crd() -> dict[str, Any]:
    return _crd(
        kind=ResidencyPolicy.KIND,
        plural=ResidencyPolicy.PLURAL,
        short_names=["rp"],
        scope="Cluster",
        schema=_object_schema(ResidencyPolicy),
        subresources={},
        columns=[
            {"name": "Jurisdiction", "type": "string", "jsonPath": ".spec.jurisdiction"},
            {"name": "Regions", "type": "string", "jsonPath": ".spec.regions"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def tenant_crd() -> dict[str, Any]:
    return _crd(
        kind=Tenant.KIND,
        plural=Tenant.PLURAL,
        short_names=["tn"],
        scope="Cluster",
        schema=_object_schema(Tenant),
        subresources={"status": {}},
        columns=[
            {"name": "Namespace", "type": "string", "jsonPath": ".spec.namespace"},
            {"name": "Policy", "type": "string", "jsonPath": ".spec.residencyPolicy"},
            {"name": "GPU-Quota", "type": "integer", "jsonPath": ".spec.quota.gpus"},
            {"name": "GPUs-Used", "type": "integer", "jsonPath": ".status.gpusInUse"},
            _condition_column(ConditionType.READY),
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name (in crds/) → CRD manifest."""
    return {
        f"{GROUP}_{ModelDeployment.PLURAL}.yaml": modeldeployment_crd(),
        f"{GROUP}_{ResidencyPolicy.PLURAL}.yaml": residencypolicy_crd(),
        f"{GROUP}_{Tenant.PLURAL}.yaml": tenant_crd(),
    }
