"""The tenant guard policies as generated: placeholders, filling them in, the committed copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tramontane.cli import main
from tramontane.render.guard import (
    IMAGES_PLACEHOLDER,
    KUBERAY_PLACEHOLDER,
    OPERATOR_PLACEHOLDER,
    fill_placeholders,
    render_guard_policies,
)

REPO = Path(__file__).resolve().parents[2]
NAME = "tenant-guard-policies.yaml"


def test_the_committed_guard_policies_are_what_the_code_generates(tmp_path: Path) -> None:
    main(["guard-policies", "--output", str(tmp_path)])
    committed = (REPO / "policies/guard" / NAME).read_text()
    assert (tmp_path / NAME).read_text() == committed, "policies/guard is stale: make crds"


def test_each_policy_has_its_binding_and_denies_with_a_reason() -> None:
    objects = render_guard_policies()
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"].endswith("Policy")}
    bindings = {o["spec"]["policyName"] for o in objects if o["kind"].endswith("Binding")}
    assert set(policies) == bindings
    assert len(policies) == 4
    for policy in policies.values():
        assert policy["spec"]["failurePolicy"] == "Fail"
        for validation in policy["spec"]["validations"]:
            assert validation["reason"] == "Forbidden" and validation["messageExpression"]


def test_filling_in_leaves_no_placeholder_and_keeps_the_yaml_valid() -> None:
    text = yaml.safe_dump_all(render_guard_policies(), width=100)
    filled = fill_placeholders(
        text,
        "system:serviceaccount:tramontane-system:tramontane",
        ["system:serviceaccount:kuberay-system:kuberay-operator", "kuberay-operator"],
        ["registry.example/serving@sha256:" + "a" * 64],
    )
    for placeholder in (OPERATOR_PLACEHOLDER, KUBERAY_PLACEHOLDER, IMAGES_PLACEHOLDER):
        assert placeholder not in filled
    objects = list(yaml.safe_load_all(filled))
    assert len(objects) == len(render_guard_policies())
    assert "'system:serviceaccount:kuberay-system:kuberay-operator,kuberay-operator'" in filled


@pytest.mark.parametrize(
    "identity", ["", "evil' || true || '", "a b", "a,b", 'x"y', "back\\slash", "line\nbreak"]
)
def test_an_identity_that_could_break_out_of_the_cel_string_is_refused(identity: str) -> None:
    with pytest.raises(ValueError, match="not a plain identity"):
        fill_placeholders("x", identity, ["kuberay-operator"], ["img:1"])
