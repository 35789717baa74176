"""A real Prometheus server for the tests, and the PromQL of the chart's rules and dashboards.

The server and promtool are Debian's `prometheus` package (PROMETHEUS_DEB_VERSION of
e2e/versions.env), unpacked into the cache by `e2e/build.sh prometheus`. Each instance listens on a
free port, keeps its data in a temp dir and is configured by the test (targets, rule files).

The rest reads the shipped files: every PromQL expression of the dashboards (panel targets and
template variable queries) and of the rules, Grafana's template variables, and the metric names
an expression refers to.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import localcluster
from tests.ports import free_port
from tests.processes import start_process, stop_process

REPO = Path(__file__).resolve().parent.parent
CHART_FILES = REPO / "charts" / "tramontane" / "files"
RULES = CHART_FILES / "prometheus" / "rules.yaml"
RULE_TESTS = CHART_FILES / "prometheus" / "rules.test.yaml"
DASHBOARDS = sorted((CHART_FILES / "dashboards").glob("*.json"))


def binary(name: str) -> Path:
    """`prometheus` or `promtool` from the cache."""
    version = localcluster.versions()["PROMETHEUS_DEB_VERSION"]
    path = localcluster.CACHE / f"prometheus-{version}" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: fetch it with `e2e/build.sh prometheus`")
    return path


class QueryError(RuntimeError):
    pass


@dataclass
class Prometheus:
    workdir: Path
    scrape_configs: list[dict[str, Any]]
    rule_files: list[Path] = field(default_factory=list)
    interval: str = "1s"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": self.scrape_configs,
        }

    def start(self, timeout: float = 60) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config()))  # JSON is YAML
        self.process = start_process(
            [
                str(binary("prometheus")),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.log_path,
            self._ready,
            "Prometheus",
            timeout=timeout,
        )
        return self

    def stop(self) -> None:
        stop_process(self.process, grace=15)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:  # noqa: S310
                return int(response.status) == 200
        except OSError:
            return False

    def api(self, path: str, **params: str | list[str]) -> Any:
        """GET /api/v1/<path>; its `data`, or QueryError with Prometheus' message."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (127.0.0.1)
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (a scalar result counts as one)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self.api(f"label/{label}/values", **{"match[]": match})
        return values

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))


@contextlib.contextmanager
def running(prometheus: Prometheus) -> Iterator[Prometheus]:
    prometheus.start()
    try:
        yield prometheus
    finally:
        prometheus.stop()


# ------------------------------------------------------------------------------ the chart's files


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def query_variables(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's query variables, in order (a variable may use the ones before it)."""
    return [v for v in board["templating"]["list"] if v["type"] == "query"]


_LABEL_VALUES = re.compile(r"label_values\((?P<match>.+),\s*(?P<label>\w+)\)", re.DOTALL)


def variable_query(variable: dict[str, Any]) -> tuple[str, str]:
    """(series selector, label) of a `label_values(selector, label)` variable."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    found = _LABEL_VALUES.fullmatch(text.strip())
    if not found:
        raise ValueError(f"variable {variable['name']}: only label_values(selector, label) is used")
    return found["match"], found["label"]


# Grafana's regex escaping of variable values (multi-value and All variables), for PromQL strings.
_REGEX_SPECIAL = re.compile(r"[\\$^*{}\[\]'+?.()|]")
# What the test substitutes for Grafana's built-in intervals (scrape interval 1 s).
INTERVALS = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}


def substitute(expr: str, values: dict[str, list[str]], multi: set[str]) -> str:
    """Grafana's interpolation of `$var`, `${var}` and `[[var]]`: a multi-value variable becomes
    `(a|b)` with regex characters escaped; an unknown variable is left for the caller to see."""

    def value(name: str) -> str | None:
        if name in INTERVALS:
            return INTERVALS[name]
        chosen = values.get(name)
        if not chosen:  # unknown, or no value yet: left for the caller to see
            return None
        if name not in multi:
            return chosen[0]
        escaped = [_REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), v) for v in chosen]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        found = value(name)
        return match.group(0) if found is None else found

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


# ------------------------------------------------------------------------------ PromQL text


def _scan(expr: str) -> Iterator[tuple[int, str, int, bool]]:
    """(offset, character, nesting depth in (), {} and [], inside a string) of each character."""
    depth = 0
    quote: str | None = None
    escaped = False
    for offset, char in enumerate(expr):
        if quote:
            yield offset, char, depth, True
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
            yield offset, char, depth, True
        elif char in "([{":
            depth += 1
            yield offset, char, depth, False
        elif char in ")]}":
            yield offset, char, depth, False
            depth -= 1
        else:
            yield offset, char, depth, False


def _masked(expr: str) -> str:
    """The expression with everything inside (), {}, [] and strings blanked out: what is left is
    its top level, at the same offsets."""
    return "".join(c if depth == 0 and not quoted else " " for _, c, depth, quoted in _scan(expr))


def _unwrapped(expr: str) -> str:
    """Without parentheses that enclose the whole expression."""
    expr = expr.strip()
    while expr.startswith("("):
        closing = next(o for o, c, depth, quoted in _scan(expr) if c == ")" and depth == 1
                       and not quoted)  # fmt: skip
        if closing != len(expr) - 1:
            break  # "(a) + (b)"
        expr = expr[1:-1].strip()
    return expr


# A set operator, and its label-matching clause (`and on (a, b)`), whose list the mask blanks.
_SET_OPERATOR = re.compile(r"\b(?:and|or|unless)\b(?P<matching>\s*\b(?:on|ignoring)\b)?")
_COMPARISON = re.compile(r"(?:==|!=|>=|<=|>|<)(?:\s*bool\b)?")
_SCALAR = re.compile(r"[\d.eE+\-*/()\s]+")


def condition_terms(expr: str) -> list[str]:
    """The quantities an alert condition compares: `A > 0.9 and B > 1` → [A, B]; `absent(X)` → [X].

    A condition is a combination (and/or/unless) of a quantity compared with a number; what the
    comparison filters depends on the situation, the quantity must always exist.
    """
    expr = _unwrapped(expr)
    mask = _masked(expr)
    cuts = list(_SET_OPERATOR.finditer(mask))
    if cuts:
        parts, start = [], 0
        for cut in cuts:
            parts.append(expr[start : cut.start()])
            start = cut.end()
            labels = re.match(r"\s*\([^)]*\)", expr[start:]) if cut["matching"] else None
            start += labels.end() if labels else 0
        parts.append(expr[start:])
        return [term for part in parts for term in condition_terms(part)]
    comparison = _COMPARISON.search(mask)
    if comparison:
        left, right = expr[: comparison.start()], expr[comparison.end() :]
        if _SCALAR.fullmatch(right):
            return condition_terms(left)
        if _SCALAR.fullmatch(left):
            return condition_terms(right)
        return [*condition_terms(left), *condition_terms(right)]
    absent = re.fullmatch(r"absent\s*\((.*)\)", expr, re.DOTALL)
    if absent:
        return condition_terms(absent.group(1))
    return [expr]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
OUR_PREFIXES = ("ray_", "tramontane_")


def metric_names(expr: str) -> set[str]:
    """Names of the metrics (ours, Ray's, vLLM's) and recorded series an expression reads.

    Every metric of the platform starts with `ray_` or `tramontane_`, and only recorded series
    have a colon; label names, functions and keywords have neither.
    """
    text = re.sub(r"\$\{?\w+\}?|\[\[\w+\]\]", " ", _STRING.sub(" ", expr))
    return {
        token
        for token in _IDENTIFIER.findall(text)
        if token.startswith(OUR_PREFIXES) or ":" in token
    }
