"""A small typed kubectl wrapper for tests: the same client the README tells users to run."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class KubectlError(RuntimeError):
    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.stderr = stderr


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path
    extra: tuple[str, ...] = ()

    def as_user(self, user: str, *groups: str) -> Kubectl:
        """The same client impersonating a user (RBAC checks with --as/--as-group)."""
        flags = (f"--as={user}", *(f"--as-group={g}" for g in groups))
        return Kubectl(self.kubeconfig, (*self.extra, *flags))

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> str:
        """kubectl's output; `timeout` bounds the process (keep it above a `--timeout` passed to
        kubectl, or a slow wait ends in subprocess.TimeoutExpired instead of kubectl's answer)."""
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", *self.extra, *args]
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(list(args), result.returncode, result.stderr)
        return result.stdout

    def create_status(self, manifest: dict[str, Any]) -> int:
        """The HTTP status the API server answers a create of `manifest` with (kubectl -v=6
        logs it): 403 for a refusal, 422 for an invalid object, 500 for a broken webhook."""
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", *self.extra, "create", "-f", "-",
                "-v=6"]  # fmt: skip
        result = subprocess.run(argv, input=json.dumps(manifest), capture_output=True,
                                text=True, timeout=120, check=False)  # fmt: skip
        codes = re.findall(r"\bPOST https://\S+ (\d{3}) ", result.stderr)
        if not codes:
            raise AssertionError(f"no POST in kubectl's log:\n{result.stderr[-2000:]}")
        return int(codes[-1])

    def attempt(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run, and let the caller judge the outcome (refusals are what attack tests expect)."""
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", *self.extra, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json"))

    def apply(self, *manifests: dict[str, Any], take_over: bool = False) -> str:
        """Server-side apply as the field manager "tests"; `take_over` takes the fields another
        manager (the chart's helm) holds instead of failing on the conflict."""
        body = {"apiVersion": "v1", "kind": "List", "items": list(manifests)}
        force = ("--force-conflicts",) if take_over else ()
        return self.run(
            "apply", "--server-side", "--field-manager=tests", *force, "-f", "-",
            stdin=json.dumps(body),
        )  # fmt: skip

    def create(
        self, manifest: dict[str, Any], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["kubectl", f"--kubeconfig={self.kubeconfig}", *self.extra, "create", "-f", "-"]
        result = subprocess.run(
            argv,
            input=json.dumps(manifest),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(["create"], result.returncode, result.stderr)
        return result


def eventually(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5
) -> T:
    """Poll until probe returns something truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def tenant_manifest(
    name: str, policy: str, gpus: int = 64, deployments: int = 30, **spec: Any
) -> dict[str, Any]:
    """A Tenant whose namespace is its name, with admins and a reader."""
    return {
        "apiVersion": "tramontane.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {
            "namespace": name,
            "residencyPolicy": policy,
            "quota": {"gpus": gpus, "modelDeployments": deployments},
            "admins": {"groups": [f"{name}-admins"]},
            "members": {"users": [f"reader@{name}.example"]},
            **spec,
        },
    }
