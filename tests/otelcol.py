"""A real OpenTelemetry Collector for the tests: spans go in over OTLP, the tests read what it got.

The collector is built from its Go modules by `e2e/build.sh otelcol` (e2e/otelcol: the OTLP
receiver and the file exporter, at OTELCOL_VERSION of e2e/versions.env). Each instance listens on
free ports and writes everything it receives to a file, as OTLP JSON (one export request per
line), which `spans()` decodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import localcluster
from tests.ports import free_port
from tests.processes import start_process, stop_process


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    service: str
    attributes: dict[str, Any]
    kind: int  # OTLP SpanKind: 1 internal, 2 server, 3 client…
    status: int  # OTLP StatusCode: 0 unset, 1 ok, 2 error
    trace_id: str
    parent_span_id: str


def binary() -> Path:
    version = localcluster.versions()["OTELCOL_VERSION"]
    path = localcluster.CACHE / f"otelcol-{version}" / "otelcol"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build it with `e2e/build.sh otelcol`")
    return path


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Collector:
    workdir: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for OTLP/HTTP exporters."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def output(self) -> Path:
        return self.workdir / "traces.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "otelcol.log"

    def config(self) -> dict[str, Any]:
        return {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "http": {"endpoint": f"127.0.0.1:{self.http_port}"},
                        "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}"},
                    }
                }
            },
            "exporters": {"file": {"path": str(self.output), "flush_interval": "100ms"}},
            "service": {
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
                # No telemetry server of its own: nothing else listens on a fixed port.
                "telemetry": {"metrics": {"level": "none"}},
            },
        }

    def start(self, timeout: float = 30) -> Collector:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yaml"
        config.write_text(json.dumps(self.config()))  # JSON is YAML
        self.process = start_process(
            [str(binary()), f"--config=file:{config}"],
            self.log_path,
            lambda: _listening(self.http_port),
            "the collector",
            timeout=timeout,
            env={**os.environ, "GOMAXPROCS": "1"},
        )
        return self

    def stop(self) -> None:
        stop_process(self.process, grace=10)

    def spans(self) -> list[ReceivedSpan]:
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_text().splitlines():
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            for resource_spans in request.get("resourceSpans", []):
                resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
                for scope_spans in resource_spans.get("scopeSpans", []):
                    for span in scope_spans.get("spans", []):
                        found.append(
                            ReceivedSpan(
                                name=span["name"],
                                service=str(resource.get("service.name", "")),
                                attributes=_attributes(span.get("attributes", [])),
                                kind=int(span.get("kind", 0)),
                                status=int(span.get("status", {}).get("code", 0)),
                                trace_id=span.get("traceId", ""),
                                parent_span_id=span.get("parentSpanId", ""),
                            )
                        )
        return found

    def find(self, name: str, **attributes: Any) -> list[ReceivedSpan]:
        return [
            s
            for s in self.spans()
            if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
        ]


def _value(value: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue (int64s are JSON strings there)."""
    if "intValue" in value:
        return int(value["intValue"])
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", []))
    for kind in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        if kind in value:
            return value[kind]
    return None


def _attributes(key_values: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value", {})) for kv in key_values}


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[Collector]:
    collector = Collector(workdir).start()
    try:
        yield collector
    finally:
        collector.stop()
