"""The chart's alert rules and dashboards, without a cluster: promtool's checks and unit tests, the
rules' conventions, the dashboards' structure, and the metric names they read.

The names of Ray Serve's and vLLM's metrics can only be known from a running engine: they are
checked against the live scrape in tests/serving/test_prometheus.py. Here the operator's names come
from its registry and the serving app's from tramontane.serving.usage.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from tests import prometheus
from tramontane.controller import telemetry

SEVERITIES = {"critical", "warning", "info"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus.binary("promtool")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=prometheus.RULES.parent,
    )


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in prometheus.rules() if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", prometheus.RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(prometheus.rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", prometheus.RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() -> None:
    cases = yaml.safe_load(prometheus.RULE_TESTS.read_text())["tests"]
    evaluations = [e for case in cases for e in case.get("alert_rule_test", [])]
    for alert in alerts():
        name = alert["alert"]
        assert any(e["alertname"] == name and e["exp_alerts"] for e in evaluations), name
        assert any(e["alertname"] == name and not e["exp_alerts"] for e in evaluations), name


@pytest.mark.parametrize("alert", alerts(), ids=lambda alert: alert["alert"])
def test_alerts_have_a_severity_a_summary_and_a_description(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in SEVERITIES
    assert alert["annotations"]["summary"].strip()
    assert len(alert["annotations"]["description"].split()) > 30  # what to check, what to do
    assert alert.get("for"), "a single bad scrape or evaluation must not page anyone"
    # An alert about one tenant's deployment or quota names it.
    terms = " ".join(prometheus.condition_terms(alert["expr"]))
    if "tenant" in terms or "tramontane_tenant_" in terms or ":" in terms:
        assert "$labels.tenant" in alert["annotations"]["summary"]


@pytest.mark.parametrize("path", prometheus.DASHBOARDS, ids=lambda path: path.name)
def test_dashboards_use_the_datasource_variable_and_define_every_variable_they_use(
    path: Any,
) -> None:
    board = prometheus.dashboard(path)
    assert board["uid"] == path.stem
    assert "tramontane" in board["tags"]
    variables = board["templating"]["list"]
    assert variables[0] == {**variables[0], "name": "datasource", "type": "datasource",
                            "query": "prometheus"}  # fmt: skip
    ids = [panel["id"] for panel in prometheus.panels(board)]
    assert len(ids) == len(set(ids))
    for panel in prometheus.panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    defined = {v["name"]: ["x"] for v in variables}
    multi = {v["name"] for v in variables if v.get("multi")}
    queries = [expr for _, expr in prometheus.panel_queries(board)] + [
        prometheus.variable_query(v)[0] for v in prometheus.query_variables(board)
    ]
    for expr in queries:
        left = prometheus.substitute(expr, defined, multi)
        assert "$" not in left and "[[" not in left, f"undefined variable in {expr}"


def exported_names(metric: Metric) -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    return {metric.name + suffix for suffix in suffixes.get(metric.type, [""])}


def known_names() -> set[str]:
    """The operator's metric names, the serving app's (as Ray exports them), the recorded ones."""
    operator = {name for metric in telemetry.REGISTRY.collect() for name in exported_names(metric)}
    usage = (prometheus.REPO / "operator" / "tramontane" / "serving" / "usage.py").read_text()
    serving = set()
    for kind, name in re.findall(r'metrics\.(Counter|Histogram|Gauge)\(\s*"(\w+)"', usage):
        suffixes = {"Counter": ["_total"], "Histogram": ["_bucket", "_count", "_sum"]}
        serving |= {f"ray_{name}{suffix}" for suffix in suffixes.get(kind, [""])}
    recorded = {rule["record"] for rule in prometheus.rules() if "record" in rule}
    return operator | serving | recorded


def referenced_names() -> set[str]:
    names = set()
    for rule in prometheus.rules():
        names |= prometheus.metric_names(rule["expr"])
    for path in prometheus.DASHBOARDS:
        board = prometheus.dashboard(path)
        for _, expr in prometheus.panel_queries(board):
            names |= prometheus.metric_names(expr)
        for variable in prometheus.query_variables(board):
            names |= prometheus.metric_names(prometheus.variable_query(variable)[0])
    return names


def test_the_operators_and_serving_apps_metrics_referenced_are_the_exported_ones() -> None:
    ours = {n for n in referenced_names() if not n.startswith(("ray_serve_", "ray_vllm_"))}
    assert ours, "the dashboards and rules read our metrics"
    assert ours - known_names() == set()


def test_known_names_include_what_the_operator_and_app_export() -> None:
    names = known_names()
    assert {"tramontane_reconcile_total", "tramontane_reconcile_duration_seconds_bucket",
            "tramontane_tenant_gpu_quota", "ray_tramontane_requests_total",
            "ray_tramontane_time_to_first_token_seconds_bucket"} <= names  # fmt: skip


@pytest.mark.parametrize(
    ("condition", "terms"),
    [
        ("absent(tramontane_build_info)", ["tramontane_build_info"]),
        ('sum by (kind) (x{result="error"}) > 0', ['sum by (kind) (x{result="error"})']),
        ("a / b > 0.9", ["a / b"]),
        ("(a > (14.4 * 0.01) and b > (14.4 * 0.01)) or (c > 6 and d > 6)", ["a", "b", "c", "d"]),
        ('a > 1 and on (x, y) b{l="a > b or c"} > 0', ["a", 'b{l="a > b or c"}']),
        ("max by (a) (x == 1) == 1", ["max by (a) (x == 1)"]),
        ("(a) / (b) < 1", ["(a) / (b)"]),
        ("a != b", ["a", "b"]),
    ],
)
def test_condition_terms_are_the_quantities_an_alert_compares(
    condition: str, terms: list[str]
) -> None:
    assert prometheus.condition_terms(condition) == terms


def test_metric_names_ignore_labels_strings_functions_and_variables() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, tenant) (rate(ray_vllm_x_bucket{deployment=~"
        '"tramontane_y", tenant="$tenant"}[$__rate_interval]))) / on (tenant) '
        "ns:tramontane_z:ratio_rate5m"
    )
    assert prometheus.metric_names(expr) == {"ray_vllm_x_bucket", "ns:tramontane_z:ratio_rate5m"}


def test_substitution_escapes_multi_value_variables_as_grafana_does() -> None:
    expr = 'x{model=~"$model", tenant="${tenant}"}[$__rate_interval]'
    values = {"model": ["llama-3.1", "a"], "tenant": ["t"]}
    assert prometheus.substitute(expr, values, {"model"}) == (
        'x{model=~"(llama-3\\\\.1|a)", tenant="t"}[30s]'
    )
