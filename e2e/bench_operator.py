"""`make bench-operator`: how fast the operator reconciles N ModelDeployments (a benchmark).

For each N it starts a fresh operator process, creates N ModelDeployments in a new namespace from
8 client threads, watches them, and reports the time from each create call returning to the first
status with Reconciled=True (p50/p99), the time until all N are Reconciled, and the operator's
peak RSS (VmHWM). KubeRay runs as usual meanwhile: it creates a RayCluster per RayService, so the
control plane is as busy as it would be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import yaml

import localcluster
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "tramontane.dev", "v1alpha1", "modeldeployments"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _start_operator(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KUBECONFIG": str(localcluster.kubeconfig_path()),
        "TRAMONTANE_METRICS_PORT": str(port),
        "TRAMONTANE_METRICS_HOST": "127.0.0.1",
        "TRAMONTANE_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO / "operator"),
    }
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "tramontane.controller"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"operator did not become ready; see {log_path}")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reconcile_stats(port: int) -> dict[str, float]:
    """Reconciles done and their mean duration, from the operator's own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))

    count = value("tramontane_reconcile_duration_seconds_count")
    total = value("tramontane_reconcile_duration_seconds_sum")
    return {"reconciles": count, "mean_reconcile_seconds": total / count if count else 0.0}


def run_once(n: int, api: client.CustomObjectsApi, core: client.CoreV1Api) -> dict[str, Any]:
    namespace = f"bench-{n}-{int(time.time())}"
    # ModelDeployments live in tenant namespaces: one unrestricted tenant, quota to spare.
    tenant = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "metadata": {"name": namespace},
        "spec": {
            "namespace": namespace,
            "residencyPolicy": "unrestricted",
            "quota": {"gpus": 4 * n, "modelDeployments": n},
            "admins": {"groups": ["bench"]},
        },
    }
    api.create_cluster_custom_object(GROUP, VERSION, "tenants", tenant)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        obj = cast(
            dict[str, Any], api.get_cluster_custom_object(GROUP, VERSION, "tenants", namespace)
        )
        conditions = obj.get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            break
        time.sleep(0.5)
    template = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    created: dict[str, float] = {}
    reconciled: dict[str, float] = {}
    done = threading.Event()

    def watch_status() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            timeout_seconds=600,
        ):
            obj = event["object"]
            conditions = obj.get("status", {}).get("conditions", [])
            if any(c["type"] == "Reconciled" and c["status"] == "True" for c in conditions):
                reconciled.setdefault(obj["metadata"]["name"], time.monotonic())
                if len(reconciled) == n:
                    stream.stop()
        done.set()

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    time.sleep(0.5)  # the watch is established before the first create

    def create(i: int) -> None:
        body = dict(template, metadata={"name": f"md-{i:04d}", "namespace": namespace})
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created[f"md-{i:04d}"] = time.monotonic()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(n)))
    create_seconds = time.monotonic() - started
    done.wait(600)
    latencies = [reconciled[name] - created[name] for name in created if name in reconciled]
    result = {
        "n": n,
        "namespace": namespace,
        "reconciled": len(latencies),
        "create_seconds": create_seconds,
        "p50_seconds": _percentile(latencies, 0.5) if latencies else float("nan"),
        "p99_seconds": _percentile(latencies, 0.99) if latencies else float("nan"),
        "all_converged_seconds": (max(reconciled.values()) - started) if reconciled else None,
    }
    return result


def _cleanup(api: client.CustomObjectsApi, core: client.CoreV1Api, tenant: str) -> None:
    """Delete the deployments, then the Tenant (which owns the namespace), and wait for garbage
    collection so that the next size starts on a quiet cluster. Runs while the operator is up:
    its webhook reviews the Tenant's deletion."""
    api.delete_collection_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL)
    api.delete_cluster_custom_object(GROUP, VERSION, "tenants", tenant)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        names = [n.metadata.name for n in core.list_namespace().items if n.metadata]
        if tenant not in names:
            return
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--keep", action="store_true", help="keep the bench namespaces")
    args = parser.parse_args()
    localcluster.up()
    demo_operator = localcluster.STATE / "run" / "operator.pid"
    if demo_operator.exists():
        # Two operators would share the work and the figures would be meaningless.
        subprocess.run(["kill", demo_operator.read_text().strip()], check=False)
        demo_operator.unlink()
    subprocess.run(
        ["kubectl", f"--kubeconfig={localcluster.kubeconfig_path()}", "apply", "--server-side",
         "--force-conflicts", "-f", str(REPO / "crds"), "-f", str(REPO / "policies/admission"),
         "-f", str(REPO / "policies/presets/unrestricted.yaml")],
        check=True, capture_output=True,
    )  # fmt: skip
    api_client = config.new_client_from_config(str(localcluster.kubeconfig_path()))
    api_client.configuration.connection_pool_maxsize = 16
    api, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    log_path = localcluster.STATE / "logs" / "operator-bench.log"
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        operator = _start_operator(18099, log_path)
        try:
            result = run_once(n, api, core)
            result["operator_peak_rss_mib"] = _peak_rss_mib(operator.pid)
            result |= _reconcile_stats(18099)
            if not args.keep:  # while the operator (and its webhook) still runs
                _cleanup(api, core, result["namespace"])
        finally:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        results.append(result)
        print(
            f"N={n:5d}  reconciled {result['reconciled']}/{n}  "
            f"apply→Reconciled p50 {result['p50_seconds']:.3f}s  p99 {result['p99_seconds']:.3f}s  "
            f"all converged {result['all_converged_seconds']:.1f}s  "
            f"(creates took {result['create_seconds']:.1f}s)  "
            f"operator peak RSS {result['operator_peak_rss_mib']:.0f} MiB  "
            f"({result['reconciles']:.0f} reconciles, "
            f"mean {result['mean_reconcile_seconds'] * 1000:.0f} ms)",
            flush=True,
        )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
