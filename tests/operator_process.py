"""The real operator (`python -m tramontane.controller`) as a child process of the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.ports import free_port
from tests.processes import start_process, stop_process

REPO = Path(__file__).resolve().parent.parent
# Rendered into a tenant's serving pods only where its policy's telemetryEndpoints list it
# (test_tenancy): nothing listens there, nothing here exports to it.
SERVING_OTLP_ENDPOINT = "http://otel-collector.observability.svc:4318"


class OperatorProcess:
    """The operator on free ports, configured by environment as the chart's Deployment does."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        otlp_endpoint: str,
        extra_environment: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.extra_environment = extra_environment or {}
        self.otlp_endpoint = otlp_endpoint
        self.log_path = log_path
        self.port = free_port()
        self.webhook_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TRAMONTANE_METRICS_PORT": str(self.port),
            "TRAMONTANE_METRICS_HOST": "127.0.0.1",
            "TRAMONTANE_WEBHOOK_PORT": str(self.webhook_port),
            "PYTHONPATH": str(REPO / "operator"),
            # Each process its own peering identity, as each pod has its name (never inherited
            # from this process).
            "POD_ID": f"operator-{self.port}",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "TRAMONTANE_SERVING_OTLP_ENDPOINT": SERVING_OTLP_ENDPOINT,
            **self.extra_environment,
        }

    def start(self) -> None:
        self.process = start_process(
            [sys.executable, "-m", "tramontane.controller"],
            self.log_path,
            lambda: http_status(f"{self.url}/readyz") == 200,
            "the operator",
            timeout=60,
            env=self.environment(),
        )

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies or the OOM killer strikes."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process, grace=15)


def http_status(url: str) -> int:
    """The status of a GET, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (http://127.0.0.1)
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0
