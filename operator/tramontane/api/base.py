"""Shared building blocks of the tramontane.dev API models.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python. CEL rules
that the API server enforces are attached with `cel()` and end up as `x-kubernetes-validations`
in the generated CRD schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

GROUP = "tramontane.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class ApiModel(BaseModel):
    """camelCase aliases, unknown fields rejected (the API server prunes them anyway)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON form used in manifests: camelCase, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, *, field_path: str | None = None) -> dict[str, str]:
    """One x-kubernetes-validations entry."""
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """json_schema_extra for a model or field carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


def rules(*cel_rules: dict[str, str]) -> ConfigDict:
    """model_config of an ApiModel whose object carries CEL rules."""
    return ConfigDict(**ApiModel.model_config, json_schema_extra=validations(*cel_rules))


def immutable(name: str, kind: str) -> dict[str, Any]:
    """CEL: the field never changes once set; the message says which object to create instead."""
    return validations(
        cel("self == oldSelf", f"{name} is immutable: create a new {kind} to change it")
    )
