"""Pure residency and tenant rendering rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tramontane.api.labels import POLICY_LABEL, TENANT_LABEL
from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.policy.residency import (
    ResidencyError,
    disallowed_sources,
    governing_policy,
    gpus_at_max_scale,
    quota_violation,
    region_requirements,
    source_allowed,
    telemetry_allowed,
)
from tramontane.render.admission import render_bindings
from tramontane.render.rayservice import RenderOptions, render_rayservice
from tramontane.render.tenant import (
    TenancyError,
    TenantOptions,
    owning_tenant,
    render_tenant,
)

REPO = Path(__file__).resolve().parents[2]


def preset(name: str) -> ResidencyPolicy:
    return ResidencyPolicy.from_body(
        yaml.safe_load((REPO / f"policies/presets/{name}.yaml").read_text())
    )


def md(name: str = "m", **spec: Any) -> ModelDeployment:
    body = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    body["metadata"] |= {"name": name, "uid": "u1", "generation": 1}
    body["spec"].update(spec)
    return ModelDeployment.from_body(body)


def tenant(gpus: int = 8, deployments: int = 3) -> Tenant:
    return Tenant.from_body({
        "metadata": {"name": "acme", "uid": "t1"},
        "spec": {"namespace": "acme", "residencyPolicy": "eu",
                 "quota": {"gpus": gpus, "modelDeployments": deployments},
                 "admins": {"groups": ["acme-admins"]}},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("uri", "patterns", "allowed"),
    [
        ("s3://acme-eu-models/llama/v1", ["s3://acme-eu-*/**"], True),
        ("s3://acme-us-models/llama", ["s3://acme-eu-*/**"], False),
        ("s3://acme-eu-x/a", ["s3://acme-eu-*"], False),  # * stays within one segment
        ("pvc://models/llama", ["pvc://**"], True),
        ("pvc://models/llama", ["pvc://*"], False),
        ("hf://meta-llama/Llama-3.1-8B", ["**"], True),
        ("s3://acme-eu-models.evil.com/x", ["s3://acme-eu-models/**"], False),
    ],
)
def test_source_globs(uri: str, patterns: list[str], allowed: bool) -> None:
    assert source_allowed(uri, patterns) is allowed


def test_disallowed_sources_lists_model_and_adapters() -> None:
    deployment = md()  # s3://acme-eu-models/... with two s3 adapters
    assert len(disallowed_sources(deployment, preset("eu").spec)) == 3
    assert disallowed_sources(deployment, preset("unrestricted").spec) == []


def test_the_governing_policy_is_the_tenants_when_it_allows_every_source() -> None:
    """The one residency check of admission and reconcile (they refuse or withdraw on it)."""
    allowing = preset("unrestricted")
    assert governing_policy(md(), tenant(), allowing) is allowing
    with pytest.raises(ResidencyError) as missing:
        governing_policy(md(), tenant(), None)
    assert missing.value.reason == "ResidencyPolicyNotFound"
    assert missing.value.field is None
    assert str(missing.value) == "ResidencyPolicy eu of tenant acme does not exist"
    with pytest.raises(ResidencyError) as denied:
        governing_policy(md(), tenant(), preset("eu"))
    assert denied.value.reason == "ModelSourceNotAllowed"
    assert denied.value.field == "spec.model.uri/spec.adapters"
    assert f"{md().spec.model.uri}, " in str(denied.value)
    assert "not allowed by ResidencyPolicy eu of tenant acme (modelSources: " in str(denied.value)


def test_region_requirements_pin_head_and_workers() -> None:
    requirements = region_requirements(preset("france").spec)
    assert requirements == [
        {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["eu-west-3"]}
    ]
    assert region_requirements(preset("unrestricted").spec) == []
    config = render_rayservice(md(), RenderOptions(), placement=requirements)["spec"][
        "rayClusterConfig"
    ]
    for group in (config["headGroupSpec"], *config["workerGroupSpecs"]):
        affinity = group["template"]["spec"]["affinity"]["nodeAffinity"]
        (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert requirements[0] in term["matchExpressions"]
    worker_term = config["workerGroupSpecs"][0]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]
    assert {e["key"] for e in worker_term["matchExpressions"]} == {
        "nvidia.com/gpu.product",
        "topology.kubernetes.io/region",
    }


def test_quota_counts_gpus_at_the_autoscaling_maximum() -> None:
    big = md("big", accelerator={"type": "H100", "count": 2}, scaling={"maxReplicas": 3})
    assert gpus_at_max_scale(big) == 6
    small = md("small", scaling={"maxReplicas": 2})
    assert quota_violation(tenant(gpus=8), {big.name: gpus_at_max_scale(big)}, small) is None
    message = quota_violation(
        tenant(gpus=8), {big.name: gpus_at_max_scale(big)}, md("more", scaling={"maxReplicas": 3})
    )
    assert message is not None
    assert "quota.gpus is 8" in message and "6 in use" in message and "needs 3" in message
    count = quota_violation(
        tenant(gpus=100, deployments=1), {small.name: gpus_at_max_scale(small)}, big
    )
    assert count is not None and "quota.modelDeployments is 1" in count


def test_tenant_objects_are_owned_labelled_and_restricted() -> None:
    objects = render_tenant(tenant(), preset("eu"), TenantOptions())
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace"
    assert {"ResourceQuota", "LimitRange", "NetworkPolicy", "Role", "RoleBinding"} <= set(kinds)
    for obj in objects:
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "Tenant"
        assert obj["metadata"]["labels"]["tramontane.dev/tenant"] == "acme"
    namespace = objects[0]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["tramontane.dev/jurisdiction"] == "EU"
    admin = next(
        o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("admin")
    )
    for rule in admin["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_committed_admission_policies_are_generated(tmp_path: Path) -> None:
    from tramontane.cli import main  # noqa: PLC0415

    main(["admission-policies", "--output", str(tmp_path)])
    name = "residency-admission-policies.yaml"
    committed = (REPO / "policies/admission" / name).read_text()
    assert (tmp_path / name).read_text() == committed, "policies/admission is stale: make crds"


def claimant(name: str, namespace: str = "acme", policy: str = "eu") -> Tenant:
    return Tenant.from_body({
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {"namespace": namespace, "residencyPolicy": policy,
                 "quota": {"gpus": 8, "modelDeployments": 3},
                 "admins": {"groups": [f"{name}-admins"]}},
    })  # fmt: skip


OWNED = {TENANT_LABEL: "acme", POLICY_LABEL: "eu"}


@pytest.mark.parametrize(
    ("labels", "claimants", "reason"),
    [
        (OWNED, [], "NoTenant"),  # labelled as a tenant's, but no Tenant claims it
        ({}, [claimant("acme")], "TenancyMismatch"),  # label removed
        ({TENANT_LABEL: "acme"}, [claimant("acme")], "TenancyMismatch"),  # policy label removed
        ({**OWNED, POLICY_LABEL: "unrestricted"}, [claimant("acme")], "TenancyMismatch"),
        ({**OWNED, TENANT_LABEL: "other"}, [claimant("acme")], "TenancyMismatch"),
        (OWNED, [claimant("other")], "TenancyMismatch"),  # claimed by someone else
    ],
)
def test_tenancy_in_doubt_fails_closed_naming_why(
    labels: dict[str, str], claimants: list[Tenant], reason: str
) -> None:
    with pytest.raises(TenancyError) as refused:
        owning_tenant("acme", labels, claimants)
    assert refused.value.reason == reason
    assert "namespace acme" in str(refused.value)


def test_the_owner_is_the_claimant_the_operators_label_names() -> None:
    # A second Tenant claiming the same namespace is NamespaceTaken: the label decides.
    owner = owning_tenant("acme", OWNED, [claimant("late"), claimant("acme")])
    assert owner.name == "acme"


def test_residency_bindings_are_not_owned_by_their_policy_and_deny_without_it() -> None:
    policy = preset("eu").model_copy(update={"metadata": {"name": "eu", "uid": "p1"}})
    for binding in render_bindings(policy):
        assert "ownerReferences" not in binding["metadata"]
        assert binding["spec"]["paramRef"] == {"name": "eu", "parameterNotFoundAction": "Deny"}


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("https://otel.eu-collector.example/v1", True),
        ("https://otel.eu-collector.example/v1/traces", True),
        ("https://otel.eu-collector.example/v10", False),  # not under the path: whole segments
        ("https://otel.eu-collector.example.evil.com/v1", False),  # look-alike host
        ("http://otel.eu-collector.example/v1", False),  # another scheme
        ("http://otel-collector.observability:4318", True),
        ("http://otel-collector.observability:4319", False),
    ],
)
def test_request_spans_go_only_to_the_policys_telemetry_endpoints(
    endpoint: str, allowed: bool
) -> None:
    spec = preset("eu").spec.model_copy(
        update={"telemetry_endpoints": ["https://otel.eu-collector.example/v1",
                                        "http://otel-collector.observability:4318"]}
    )  # fmt: skip
    assert telemetry_allowed(endpoint, spec) is allowed
    assert telemetry_allowed(endpoint, preset("eu").spec) is False  # none listed: no spans
