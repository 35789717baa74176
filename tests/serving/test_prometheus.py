"""Metrics end to end: a real Prometheus scrapes the operator and the serving app, and every PromQL
expression the chart ships returns series.

Prometheus (Debian's package, from the cache) scrapes, every second, the operator's /metrics and
the metrics port of the session's local Ray instance, where Ray's metrics agent serves what every
process records: our usage metrics (`ray_tramontane_*`), Ray Serve's and vLLM's. On a cluster the
PodMonitors add the pod's `namespace` to the serving series, which the dashboards and rules select
on; the scrape config adds it here (the sample app's tenant). The chart's rule file is loaded as is.

The test then drives a reconcile of a Tenant and of a ModelDeployment in it, and requests to the
sample app (two waves: Ray creates a series at its first increment, and a rate needs a change it
can see), and evaluates:
- every dashboard panel query, after Grafana's interpolation: the template variables take their
  values from their own `label_values` queries against this Prometheus (as Grafana does; a
  multi-value variable takes all of them), `$__rate_interval` 30s, `$__range` 5m;
- every recording rule's expression, and its recorded series;
- for every alert, the quantities its condition compares (tests.prometheus.condition_terms:
  `A > 0.9` → A, `absent(X)` → X), not the condition itself. A healthy test system must not
  fire alerts, so the conditions are empty here by design; that each fires when it should, and only
  then, is what the promtool unit tests (rules.test.yaml) check. What this test adds is that the
  quantities exist: right names, right labels, joins that match on real series.
Each must return at least one series. The metric names they read must all be in the live scrape.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests import prometheus
from tests.kube import Kubectl, eventually, tenant_manifest
from tests.operator_process import OperatorProcess
from tests.prometheus import Prometheus
from tests.serving.openai_requests import chat
from tests.serving.served_app import ServedApp
from tramontane.api.serving import ServingArgs

pytestmark = [pytest.mark.serving, pytest.mark.integration]
log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tenant(cluster: Kubectl, operator: OperatorProcess) -> Iterator[str]:
    """A Tenant (its name is its namespace) with a GPU quota, reconciled by the operator."""
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    cluster.run("apply", "-f", str(REPO / "policies/presets/unrestricted.yaml"))
    cluster.apply(tenant_manifest(name, "unrestricted", gpus=8, deployments=5))
    yield name
    cluster.run("delete", "md", "--all", "-n", name, "--wait=true", check=False)
    cluster.run("delete", "tenant", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def scraping(
    operator: OperatorProcess,
    sample_app: ServedApp,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    serving_tenant = ServingArgs.model_validate(sample_app.config["applications"][0]["args"]).tenant
    ray_metrics = urlsplit(sample_app.ray.metrics_url)
    server = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        scrape_configs=[
            {
                "job_name": "tramontane-operator",
                "static_configs": [{"targets": [urlsplit(operator.url).netloc]}],
            },
            {
                "job_name": "tramontane-serving",
                "metrics_path": ray_metrics.path,
                "static_configs": [
                    {"targets": [ray_metrics.netloc], "labels": {"namespace": serving_tenant}}
                ],
            },
        ],
        rule_files=[prometheus.RULES],
    )
    with prometheus.running(server):
        yield server


def drive_reconciles(cluster: Kubectl, tenant: str) -> None:
    cluster.run("wait", f"tenant/{tenant}", "--for=condition=Ready", "--timeout=60s")
    md: dict[str, Any] = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    md["metadata"] = {"name": "llama", "namespace": tenant}
    cluster.apply(md)
    cluster.run("wait", "md/llama", "-n", tenant, "--for=condition=Reconciled", "--timeout=60s")


def drive_requests(app: ServedApp) -> None:
    """Every kind of answer the dashboards break down: streamed and not, base model and adapter,
    two keys, a 401 and a 404."""
    with app.client("app-a") as a, app.client("app-b") as b, app.client(None) as anonymous:
        assert a.post("/v1/chat/completions", json=chat(app.model)).status_code == 200
        assert b.post("/v1/chat/completions", json=chat(app.adapters[0])).status_code == 200
        with a.stream("POST", "/v1/chat/completions",
                      json=chat(app.model, max_tokens=16, stream=True)) as streamed:  # fmt: skip
            assert streamed.status_code == 200
            streamed.read()
        assert a.post("/v1/completions", json={"model": app.model, "prompt": "Bonjour",
                                               "max_tokens": 8}).status_code == 200  # fmt: skip
        assert anonymous.post("/v1/chat/completions", json=chat(app.model)).status_code == 401
        assert a.post("/v1/chat/completions", json=chat("no-such-model")).status_code == 404


def expressions(server: Prometheus, prefer: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) of everything the chart ships, variables interpolated.

    A variable's first value is what a dashboard shows; `prefer` puts the named value first (the
    deployment this test sends requests to: other tests' applications, gone since, may still have
    series of their replicas and sort first)."""
    found: list[tuple[str, str]] = []
    for path in prometheus.DASHBOARDS:
        board = prometheus.dashboard(path)
        values: dict[str, list[str]] = {}
        multi = {v["name"] for v in prometheus.query_variables(board) if v.get("multi")}
        for variable in prometheus.query_variables(board):
            match, label = prometheus.variable_query(variable)
            selector = prometheus.substitute(match, values, multi)
            found_values = sorted(server.label_values(label, selector))
            wanted = (prefer or {}).get(variable["name"])
            if wanted in found_values:
                found_values = [wanted, *(v for v in found_values if v != wanted)]
            values[variable["name"]] = found_values
            found.append((f"{path.name} variable {variable['name']}", selector))
            if not values[variable["name"]]:
                break  # the panels that need it are reported empty below
        for title, expr in prometheus.panel_queries(board):
            found.append(
                (f"{path.name} panel {title!r}", prometheus.substitute(expr, values, multi))
            )
    for rule in prometheus.rules():
        if "record" in rule:
            found.append((f"recording rule {rule['record']}", rule["expr"]))
            found.append((f"recorded series {rule['record']}", rule["record"]))
        else:
            for term in prometheus.condition_terms(rule["expr"]):
                found.append((f"alert {rule['alert']}", term))
    return found


def empty_expressions(server: Prometheus, prefer: dict[str, str] | None = None) -> list[str]:
    empty = []
    for where, expr in expressions(server, prefer):
        try:
            if not server.query(expr):
                empty.append(f"{where}: {' '.join(expr.split())}")
        except prometheus.QueryError as error:
            empty.append(f"{where}: {error}: {expr}")
    return empty


def test_every_dashboard_and_rule_expression_returns_series_from_the_live_scrape(
    cluster: Kubectl, tenant: str, sample_app: ServedApp, scraping: Prometheus
) -> None:
    started = time.monotonic()
    drive_reconciles(cluster, tenant)
    drive_requests(sample_app)
    time.sleep(3)  # a few scrapes of the first values
    drive_requests(sample_app)

    # Ray's agent publishes what the processes recorded every few seconds: poll until it has.
    last: list[str] = []

    def all_return_series() -> bool:
        nonlocal last
        last = empty_expressions(scraping, {"deployment": sample_app.name})
        return not last

    try:
        eventually(all_return_series, 90, "every expression to return series", interval=2)
    except AssertionError:
        pytest.fail("expressions without series:\n" + "\n".join(last))

    evaluated = expressions(scraping)
    rules = scraping.api("rules")["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]
                 if r["health"] != "ok"]  # fmt: skip
    assert not unhealthy
    assert sum(len(g["rules"]) for g in rules) == len(prometheus.rules())

    live = scraping.metric_names()
    referenced = set().union(*(prometheus.metric_names(expr) for _, expr in evaluated))
    assert referenced - live == set(), "names that no target exports (nor a rule records)"
    assert {n for n in referenced if n.startswith("ray_vllm_")}, "vLLM's metrics are read"
    assert {n for n in referenced if n.startswith("ray_serve_")}, "Ray Serve's metrics are read"

    version = scraping.api("status/buildinfo")["version"]
    on_dashboards = sum(1 for where, _ in evaluated if ".json" in where)
    log.warning(
        "Prometheus %s: all %d expressions returned series (%d of the dashboards' queries and "
        "variables, %d of the rules) %.0fs after the first request",
        version, len(evaluated), on_dashboards, len(evaluated) - on_dashboards,
        time.monotonic() - started,
    )  # fmt: skip
