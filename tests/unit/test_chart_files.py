"""The Helm chart's copied files and its values documentation, without Helm (see
tests/integration/test_chart.py for helm lint/template/install)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tramontane.docs import value_descriptions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tramontane"
HINT = "run `make crds` (it copies crds/ and policies/ into the chart) and commit"


@pytest.mark.parametrize(
    ("source", "copy"),
    [
        (ROOT / "crds", CHART / "crds"),
        (ROOT / "policies" / "admission", CHART / "files" / "admission"),
        (ROOT / "policies" / "guard", CHART / "files" / "guard"),
    ],
)
def test_chart_carries_the_generated_manifests_unchanged(source: Path, copy: Path) -> None:
    for original in sorted(source.glob("*.yaml")):
        copied = copy / original.name
        assert copied.exists(), f"{copied.relative_to(ROOT)} missing: {HINT}"
        assert copied.read_bytes() == original.read_bytes(), (
            f"{copied.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: {HINT}"
        )


def test_chart_crds_are_ours_plus_kopf_peering() -> None:
    ours = {p.name for p in (ROOT / "crds").glob("*.yaml")}
    in_chart = {p.name for p in (CHART / "crds").glob("*.yaml")}
    assert in_chart == ours | {"kopf.dev_clusterkopfpeerings.yaml"}


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not path.endswith(("resources", "issuerRef")):
            keys += _leaves(value, f"{path}.")
        else:
            keys.append(path)
    return keys


def test_every_value_is_documented() -> None:
    """Each leaf of values.yaml has a `# --` comment right above it (helm-docs convention)."""
    text = (CHART / "values.yaml").read_text()
    documented = value_descriptions(text)
    undocumented = [path for path in _leaves(yaml.safe_load(text)) if not documented.get(path)]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_default_values_satisfy_the_schema() -> None:
    # jsonschema is in the serving environment (`make test`), not the dev one (`make test-unit`);
    # helm lint validates the values against the schema too (tests/integration/test_chart.py).
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), _schema())


def test_schema_covers_every_value() -> None:
    """additionalProperties: false everywhere, so every key of values.yaml must be declared."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], schema: dict[str, Any], prefix: str) -> list[str]:
        missing = []
        for key, value in node.items():
            declared = schema.get("properties", {}).get(key)
            if declared is None:
                missing.append(f"{prefix}{key}")
            elif isinstance(value, dict) and "properties" in declared:
                missing += walk(value, declared, f"{prefix}{key}.")
        return missing

    assert walk(values, _schema(), "") == []
