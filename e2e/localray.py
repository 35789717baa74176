"""A local Ray instance that runs Tramontane's serving app the way a RayService does.

KubeRay deploys a RayService's serveConfigV2 by PUTting it to the Ray dashboard's Serve REST API
(`/api/serve/applications/`) on the head pod; this does the same against a local `ray start
--head`, so the config the operator renders is deployed by Serve's own deploy path, not by a
test-only `serve.run`. It runs in the serving environment (`make venv-serving`, .venv-serving).

    python e2e/localray.py up [--gpus N --accelerator H100]   start the head (or reuse it)
    python e2e/localray.py deploy FILE                       PUT a serve config (YAML/JSON)
    python e2e/localray.py status                            the Serve applications' status
    python e2e/localray.py serve-rendered FILE               run a RayService's serveConfigV2
                                                             here with the tiny test model
    python e2e/localray.py down                              stop every process of it

GPUs cannot exist here: `--gpus/--accelerator` only declare Ray *resources* (`GPU`,
`accelerator_type:H100`) so that a config rendered for H100 nodes is placed as on them; the
engine is vLLM's CPU build either way. Processes are found by the instance's temp dir in their
command line, like e2e/localcluster.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tramontane.api.serving import RAY_SERVE_ENV

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parent
STATE = Path(os.environ.get("TRAMONTANE_RAY_DIR", REPO / ".ray")).resolve()
VENV = Path(os.environ.get("TRAMONTANE_SERVING_VENV", REPO / ".venv-serving"))

PORTS = {
    "gcs": int(os.environ.get("TRAMONTANE_RAY_GCS_PORT", "16379")),
    "dashboard": int(os.environ.get("TRAMONTANE_RAY_DASHBOARD_PORT", "18265")),
    "metrics": int(os.environ.get("TRAMONTANE_RAY_METRICS_PORT", "18090")),
    "client": int(os.environ.get("TRAMONTANE_RAY_CLIENT_PORT", "18001")),
    "agent": int(os.environ.get("TRAMONTANE_RAY_AGENT_PORT", "18266")),
}
# Serve's HTTP port comes from the serve config (the operator renders 8000, as in the pod).
WORKER_PORTS = (21000, 21999)  # clear of the local Kubernetes cluster's ports
# Where ingress replicas serve HTTP themselves (Ray Serve's direct ingress, behind HAProxy):
# Ray's default, 30000-31000, is the NodePort range of the local cluster's kube-proxy.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "22000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "22999",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "23000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "23999",
}
INSTANCE_ENV = "TRAMONTANE_RAY_INSTANCE"  # marks every process of the instance


def temp_dir() -> Path:
    # Ray puts Unix sockets in its temp dir: keep the path short (108-byte socket path limit).
    digest = hashlib.sha256(str(STATE).encode()).hexdigest()[:8]
    return Path("/tmp") / f"tramontane-ray-{digest}"  # noqa: S108 (short path needed, per-repo)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _session_of(pid: int) -> int | None:
    """The session id of a live process (None for zombies: they are only waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces), from the last ")": state ppid pgrp
    # session ...
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[3])


def _pids() -> list[int]:
    """Processes of this instance.

    `ray start` runs in a session of its own (start_new_session) and every Ray process inherits
    it, so the session id (kept in the state dir) finds them all, even after the raylet is gone.
    Ray renames its processes (`ray::DashboardAgent` …), and the rename may overwrite what
    /proc shows of their environment, so neither is reliable alone; the temp dir in the command
    line or environment is checked too, for instances started before the session was recorded.
    """
    marker = str(temp_dir()).encode()
    session_file = STATE / "ray.session"
    sessions = (
        {int(s) for s in session_file.read_text().split()} if session_file.exists() else set()
    )
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        pid = int(proc.name)
        if _session_of(pid) in sessions:
            found.append(pid)
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in seen:
            found.append(pid)
    return sorted(found)


def _http(method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (local URL)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        text = response.read().decode()
    return json.loads(text) if text.strip() else None


@dataclass
class LocalRay:
    num_cpus: int = 16
    gpus: int = 0
    accelerator: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Ray Serve's settings of the serving topology, as the operator renders them on a pod
    # (empty: Ray's defaults, what vanilla Ray Serve LLM runs with).
    serve_env: dict[str, str] = field(default_factory=lambda: dict(RAY_SERVE_ENV))

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{PORTS['dashboard']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{PORTS['metrics']}/metrics"

    def healthy(self) -> bool:
        try:
            _http("GET", f"{self.dashboard}/api/serve/applications/", timeout=5)
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            return False
        return True

    def up(self, timeout: float = 120, *, fresh: bool = False) -> None:
        """Start the head; reuse a healthy running one unless `fresh` (then it is replaced)."""
        if not fresh and _pids() and self.healthy():
            return
        self.down()
        deadline = time.monotonic() + 30  # sockets of processes that just exited
        while (busy := [f"{n} {p}" for n, p in PORTS.items() if not _port_free(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(1)
        if busy:
            raise RuntimeError(f"ports in use, cannot start Ray: {', '.join(busy)}")
        STATE.mkdir(parents=True, exist_ok=True)
        resources = {f"accelerator_type:{self.accelerator}": 1} if self.accelerator else {}
        command = [
            str(VENV / "bin" / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir()}",
            f"--port={PORTS['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={PORTS['dashboard']}",
            f"--dashboard-agent-listen-port={PORTS['agent']}",
            f"--metrics-export-port={PORTS['metrics']}",
            f"--ray-client-server-port={PORTS['client']}",
            f"--min-worker-port={WORKER_PORTS[0]}",
            f"--max-worker-port={WORKER_PORTS[1]}",
            # Logical CPUs: a replica reserves some, the Serve controller, proxy and ingress
            # more; with the 2 real ones the ingress would starve (ENVIRONMENT.md).
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.gpus}",
            f"--resources={json.dumps(resources)}",
        ]
        # Token authentication (on by default since Ray 2.5x) guards the dashboard API; this
        # instance listens on 127.0.0.1 only, and tests and the demo call it directly.
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            **DIRECT_INGRESS_ENV,
            **self.serve_env,
            **self.env,
        }
        env[INSTANCE_ENV] = str(temp_dir())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "operator"), env.get("PYTHONPATH", "")) if p
        )
        log = (STATE / "ray-start.log").open("ab")
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        (STATE / "ray.session").write_text(f"{head.pid}\n")  # its session id: see _pids
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray did not start in {timeout:.0f}s: see {log.name}")
            time.sleep(1)

    def down(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            pids = _pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _pids():
                break
        if not _pids():
            (STATE / "ray.session").unlink(missing_ok=True)

    def deploy(self, serve_config: dict[str, Any]) -> None:
        """Deploy declaratively, as KubeRay does: the config replaces all applications."""
        _http("PUT", f"{self.dashboard}/api/serve/applications/", serve_config)

    def applications(self) -> dict[str, Any]:
        status = _http("GET", f"{self.dashboard}/api/serve/applications/")
        apps: dict[str, Any] = (status or {}).get("applications") or {}
        return apps

    def wait_running(self, names: list[str], timeout: float = 600) -> dict[str, Any]:
        """Wait until the named applications are RUNNING; raise with Serve's message if not."""
        deadline = time.monotonic() + timeout
        apps: dict[str, Any] = {}
        while time.monotonic() < deadline:
            apps = self.applications()
            states = {name: (apps.get(name) or {}).get("status") for name in names}
            failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
            if failed:
                messages = {n: apps[n].get("message") for n in failed}
                raise RuntimeError(f"Serve applications failed: {messages}")
            if all(state == "RUNNING" for state in states.values()):
                return apps
            time.sleep(2)
        raise TimeoutError(f"applications not RUNNING after {timeout:.0f}s: {json.dumps(apps)}")

    def replicas(self, app: str, deployment_prefix: str) -> list[dict[str, Any]]:
        """The replicas of the app's deployments whose name starts with the prefix."""
        deployments = (self.applications().get(app) or {}).get("deployments") or {}
        return [
            replica
            for name, deployment in deployments.items()
            if name.startswith(deployment_prefix)
            for replica in deployment.get("replicas") or []
        ]


LOCAL_CLAIM = "local-models"  # the "PVC" that holds the tiny test model on this machine


def localize(serve_config: dict[str, Any], keys_folder: Path) -> tuple[dict[str, Any], Path]:
    """A rendered serveConfigV2, made runnable here: (config, model root to export).

    Only what cannot exist on this machine changes: the weights become the tiny test model (and
    its adapters, by the same names) on a local "PVC", the accelerator becomes CPU (for GPU
    accelerators Ray Serve LLM runs vLLM's Ray executor, which vLLM's CPU build refuses), and
    the API keys come from a local folder instead of the mounted Secret.
    """
    from testmodel import ensure_adapter, ensure_model  # noqa: PLC0415
    from tramontane.api.serving import ServingAccelerator, ServingArgs  # noqa: PLC0415

    model = ensure_model()
    root = STATE / "model-root"
    root.mkdir(parents=True, exist_ok=True)
    link = root / LOCAL_CLAIM
    if not link.is_symlink():
        link.symlink_to(model.parent, target_is_directory=True)
    config = json.loads(json.dumps(serve_config))
    for app in config["applications"]:
        args = ServingArgs.model_validate(app["args"])
        adapters = [
            adapter.model_copy(
                update={
                    "uri": f"pvc://{LOCAL_CLAIM}/{model.name}-adapters/"
                    + ensure_adapter(model, adapter.name).name
                }
            )
            for adapter in args.adapters
        ]
        local = args.model_copy(
            update={
                "model": args.model.model_copy(update={"uri": f"pvc://{LOCAL_CLAIM}/{model.name}"}),
                "adapters": adapters,
                "accelerator": ServingAccelerator(type="CPU", gpus=0),
                "api_keys_path": str(keys_folder),
            }
        )
        app["args"] = local.to_wire()
    return config, root


def serve_rendered(file: Path) -> None:
    """Deploy a rendered serveConfigV2 on a local Ray instance; print how to call it."""
    keys = STATE / "api-keys"
    keys.mkdir(parents=True, exist_ok=True)
    key_file = keys / "demo"
    if not key_file.exists():
        key_file.write_text(f"sk-demo-{os.urandom(12).hex()}\n")
        key_file.chmod(0o600)
    config, root = localize(yaml.safe_load(file.read_text()), keys)
    ray = LocalRay(env={"VLLM_CPU_KVCACHE_SPACE": "1", "TRAMONTANE_MODEL_ROOT": str(root)})
    ray.up(fresh=True)
    names = [app["name"] for app in config["applications"]]
    started = time.monotonic()
    ray.deploy(config)
    ray.wait_running(names, timeout=900)
    print(f"Serve applications RUNNING after {time.monotonic() - started:.0f}s: {', '.join(names)}")
    from tramontane.api.serving import ServingArgs  # noqa: PLC0415

    args = ServingArgs.model_validate(config["applications"][0]["args"])
    port = (config.get("http_options") or {}).get("port", 8000)
    body = json.dumps(
        {
            "model": args.model.served_name,
            "messages": [{"role": "user", "content": "Bonjour !"}],
            "max_tokens": 32,
        }
    )
    print(
        f"OpenAI-compatible endpoint: http://127.0.0.1:{port}/v1  (models: "
        + ", ".join([args.model.served_name, *(a.name for a in args.adapters)])
        + ")"
    )
    # In the node profile the local cluster and this Ray run in the cluster's network namespace.
    enter = "e2e/netns.sh exec " if os.environ.get("TRAMONTANE_CLUSTER_PROFILE") == "node" else ""
    print("Try:")
    print(f"  {enter}curl -s http://127.0.0.1:{port}/v1/chat/completions \\")
    print(f'    -H "Authorization: Bearer $(cat {key_file})" \\')
    print("    -H 'Content-Type: application/json' \\")
    print(f"    -d '{body}'")
    print(f"Usage metrics: curl -s {ray.metrics_url} | grep ray_tramontane_")
    print("Stop it with: make serve-down")


@contextlib.contextmanager
def running(ray: LocalRay) -> Iterator[LocalRay]:
    """A fresh instance with this one's settings (a running one, e.g. the demo's, is replaced)."""
    ray.up(fresh=True)
    try:
        yield ray
    finally:
        ray.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localray.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("--gpus", type=int, default=0)
    up.add_argument("--accelerator")
    up.add_argument("--num-cpus", type=int, default=16)
    deploy = sub.add_parser("deploy")
    deploy.add_argument("file", type=Path)
    deploy.add_argument("--wait", type=float, default=600)
    sub.add_parser("status")
    sub.add_parser("down")
    rendered = sub.add_parser("serve-rendered")
    rendered.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "up":
        LocalRay(num_cpus=args.num_cpus, gpus=args.gpus, accelerator=args.accelerator).up()
        print(f"Ray is up: dashboard {LocalRay().dashboard}")
    elif args.command == "deploy":
        ray = LocalRay()
        config = yaml.safe_load(args.file.read_text())
        ray.deploy(config)
        ray.wait_running([app["name"] for app in config["applications"]], timeout=args.wait)
        print("RUNNING:", ", ".join(app["name"] for app in config["applications"]))
    elif args.command == "status":
        print(json.dumps(LocalRay().applications(), indent=2))
    elif args.command == "serve-rendered":
        serve_rendered(args.file)
    else:
        LocalRay().down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
