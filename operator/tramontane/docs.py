"""Reference documentation generated from the code (pure: no I/O).

- `docs/api.md`, the API reference, from the CRDs that `tramontane.api.crd` generates from the
  pydantic models: the CRD schema is what the API server enforces, so the reference shows exactly
  that (every field, its type, default, bounds, pattern, enum and description, and every CEL rule
  with its message). It reads the schema `crd.py` makes of the models, so whatever the models
  gain shows up here with no walk of the pydantic models of its own.
- The Helm chart's README, from the `# --` comments of its values.yaml (helm-docs' convention):
  a table of every documented value with its type and default.

`make docs` (`tramontane docs`) writes both; a unit test fails when the committed files are stale.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

# Keywords a field's row shows in a column of their own, or that are walked into; every other
# keyword of its schema is a constraint and is shown as written, so a new one cannot go missing.
_SHOWN_APART = {
    "type",
    "format",
    "description",
    "default",
    "properties",
    "items",
    "additionalProperties",
    "required",
    "x-kubernetes-validations",
}
# The Kubernetes object's own fields: each kind's heading gives apiVersion and kind.
_OBJECT_FIELDS = {"apiVersion", "kind", "metadata"}
_SCOPES = {"Namespaced": "namespaced", "Cluster": "cluster-scoped"}
# Keys of an x-kubernetes-validations entry shown in columns of their own.
_RULE_COLUMNS = {"rule", "message", "fieldPath"}


def _cell(text: str) -> str:
    """Text for one Markdown table cell: on one line, its pipes escaped (also inside code spans)."""
    return " ".join(text.split()).replace("|", "\\|")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _code(text: str) -> str:
    """A Markdown code span of the text as written, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padding = " " if longest else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _prose(text: str) -> str:
    """Descriptions as Markdown: outside their code spans, `<name>` is no HTML tag and `*` no
    emphasis."""
    parts = text.split("`")
    for outside in range(0, len(parts), 2):
        parts[outside] = parts[outside].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts)


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    return [_row(*header), "|" + "---|" * len(header), *(_row(*row) for row in rows)]


@dataclass(frozen=True)
class _Field:
    path: str
    schema: dict[str, Any]
    required: bool


def _fields(schema: dict[str, Any], path: str, *, required: bool = False) -> Iterator[_Field]:
    """The node at `path` and every node below it, in declaration order: properties as `a.b`,
    array items as `a[]`, map values as `a.*`."""
    yield _Field(path, schema, required)
    prefix = f"{path}." if path else ""
    for name, prop in schema.get("properties", {}).items():
        yield from _fields(prop, prefix + name, required=name in schema.get("required", []))
    if "items" in schema:
        yield from _fields(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _fields(schema["additionalProperties"], f"{path}.*")


def _type(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return "[]" + _type(schema.get("items", {}))
    values = schema.get("additionalProperties")
    if kind == "object" and isinstance(values, dict) and "properties" not in schema:
        return "map[string]" + _type(values)
    return f"{kind} ({schema['format']})" if "format" in schema else kind


def _constraints(field: _Field) -> str:
    shown = ["required"] if field.required else []
    for key, value in field.schema.items():
        if key == "enum":
            shown.append("one of " + ", ".join(_code(str(choice)) for choice in value))
        elif key not in _SHOWN_APART:
            shown.append(_code(f"{key}: {value if isinstance(value, str) else _json(value)}"))
    return "<br>".join(shown)


def _default(field: _Field) -> str:
    return _code(_json(field.schema["default"])) if "default" in field.schema else ""


def _description(field: _Field) -> str:
    return _prose(str(field.schema.get("description", "")))


def _is_plain_element(field: _Field) -> bool:
    """Array items or map values with nothing but their type (the parent's row shows it)."""
    return field.path.endswith(("[]", ".*")) and set(field.schema) <= {"type"}


def _rules(fields: list[_Field]) -> list[tuple[str, str, str]]:
    rows = []
    for field in fields:
        for validation in field.schema.get("x-kubernetes-validations", []):
            where = _code(field.path) if field.path else "the object"
            if "fieldPath" in validation:
                reported = (field.path + validation["fieldPath"]).lstrip(".")
                where += f", reported at {_code(reported)}"
            message = validation.get("message", "")
            for key, value in validation.items():
                if key not in _RULE_COLUMNS:
                    message += f" ({key}: {_code(str(value))})"
            rows.append((where, _code(validation["rule"]), message))
    return rows


def _kind_section(crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    (version,) = spec["versions"]
    root = version["schema"]["openAPIV3Schema"]
    short = ", ".join(_code(name) for name in names.get("shortNames", []))
    lines = [
        f"## {names['kind']}",
        "",
        _prose(root.get("description", "")),
        "",
        f"`apiVersion: {spec['group']}/{version['name']}` · `kind: {names['kind']}` · "
        f"{_SCOPES.get(spec['scope'], spec['scope'])} · `kubectl get {names['plural']}`"
        + (f" (short name {short})" if short else ""),
    ]
    for name, schema in root["properties"].items():
        if name in _OBJECT_FIELDS:
            continue
        rows = [
            (_code(f.path), _code(_type(f.schema)), _default(f), _constraints(f), _description(f))
            for f in _fields(schema, name, required=name in root.get("required", []))
            if not _is_plain_element(f)
        ]
        lines += ["", f"### {name}", ""]
        lines += _table(("Field", "Type", "Default", "Validation", "Description"), rows)
    rules = _rules(list(_fields(root, "")))
    if rules:
        lines += ["", f"### Validation rules of {names['kind']} (CEL)", ""]
        lines += _table(("On (`self`)", "Rule", "Message"), rules)
    return lines


API_HEADER = """\
<!-- Generated by `make docs` (tramontane.docs) from tramontane.api.crd's CRDs: do not edit. -->
# API reference: tramontane.dev/v1alpha1

Every field of Tramontane's custom resources, as the API server validates it. The CRDs (`crds/`)
are generated from the pydantic models in `operator/tramontane/api/`, and this page from the CRDs:
`kubectl explain` shows the same descriptions.

- **Field**: `a.b` is a field of `a`, `a[]` the items of the list `a`, `a.*` the values of the
  map `a`.
- **Default**: what the API server fills in when the field is left out (defaults of an object
  apply when the object itself is left out).
- **Validation**: the schema's bounds, patterns and enums; each kind's CEL rules follow its
  fields, with the message `kubectl apply` shows when one fails.
"""


def render_api_reference(crds: dict[str, dict[str, Any]]) -> str:
    """docs/api.md from the CRD manifests (`tramontane.api.crd.all_crds()`): a section per kind."""
    kinds = [crd["spec"]["names"]["kind"] for crd in crds.values()]
    lines = [API_HEADER.rstrip("\n"), ""]
    lines += [f"- [{kind}](#{kind.lower()})" for kind in kinds]
    for crd in crds.values():
        lines += ["", *_kind_section(crd)]
    return "\n".join(lines) + "\n"


def value_descriptions(values_yaml: str) -> dict[str, str | None]:
    """Dotted path of every key line in a chart's values.yaml → the `# --` comment right above it
    (which may continue over several `#` lines), or None when no such comment introduces it."""
    lines = values_yaml.splitlines()
    found: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        above = number - 1
        while above >= 0 and lines[above].lstrip().startswith("#"):
            if lines[above].lstrip().startswith("# --"):
                break
            above -= 1
        path = ".".join(key for _, key in stack)
        if above >= 0 and lines[above].lstrip().startswith("# --"):
            comment = " ".join(text.strip().removeprefix("#") for text in lines[above:number])
            found[path] = " ".join(comment.removeprefix(" --").split())
        else:
            found[path] = None
    return found


def _lookup(values: Any, path: str) -> Any:
    for key in path.split("."):
        values = values[key]
    return values


def _helm_type(value: Any) -> str:
    """helm-docs' names for the YAML types."""
    if isinstance(value, bool):
        return "bool"
    names = {int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), "string")


CHART_HEADER = """\
<!-- Generated by `make docs` (tramontane.docs) from Chart.yaml and the `# --` comments of
values.yaml: do not edit. -->"""


def render_chart_readme(chart_yaml: str, values_yaml: str) -> str:
    """A chart's README.md: its Chart.yaml metadata and a table of every documented value."""
    chart = yaml.safe_load(chart_yaml)
    values = yaml.safe_load(values_yaml)
    rows = [
        (_code(path), _helm_type(default), _code(_json(default)), _prose(description))
        for path, description in value_descriptions(values_yaml).items()
        if description is not None
        for default in [_lookup(values, path)]
    ]
    facts = [f"Version {chart['version']}", f"app version {chart['appVersion']}"]
    if "kubeVersion" in chart:
        facts.append(f"Kubernetes {chart['kubeVersion']}")
    lines = [
        CHART_HEADER,
        f"# {chart['name']}",
        "",
        " ".join(chart.get("description", "").split()),
        "",
        " · ".join(facts),
        "",
        "How to install, upgrade and uninstall, and the values that matter most: the project's "
        "[README](../../README.md#installing-on-a-real-cluster-helm). `values.schema.json` "
        "refuses unknown keys and wrong types at install time.",
        "",
        "## Values",
        "",
        *_table(("Key", "Type", "Default", "Description"), rows),
    ]
    return "\n".join(lines) + "\n"
