"""`make bench-operator`: how fast the operator admits and reconciles N ModelDeployments.

For each N it starts a fresh operator process (its webhook registered, as installed), creates N
ModelDeployments spread over T tenants (1 for N≤100, else 50) from 8 client threads, every one
through the webhook, watches them, and reports:
- apply → Reconciled: from each create call returning to the first status with Reconciled=True
  (p50/p99), and the time until all N are created and Reconciled;
- the webhook's latency as the API server measured it
  (apiserver_admission_webhook_admission_duration_seconds, p99 from the histogram's buckets);
- where the time goes: CPU seconds of the API server, etcd, KubeRay and the operator over the run
  (2 cores: what one spends, the others wait for);
- the operator's peak RSS (VmHWM).
KubeRay runs as usual meanwhile: it creates a RayCluster per RayService, so the control plane is
as busy as it would be. The last line is machine-readable:
  summary: n100_p50_s=… n100_p99_s=… n1000_converge_s=… n1000_p99_s=… webhook_p99_ms=… rss_mb=…
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


WEBHOOK_METRIC = "apiserver_admission_webhook_admission_duration_seconds"
# Processes whose CPU the run is charged to, by how localcluster names them.
COMPONENTS = ("kube-apiserver", "etcd", "kuberay", "kube-controller-manager")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _component_cpu(operator_pid: int) -> dict[str, float]:
    cpu = {"operator": _cpu_seconds(operator_pid)}
    for component in COMPONENTS:
        pid_file = localcluster.STATE / "run" / f"{component}.pid"
        try:
            cpu[component] = _cpu_seconds(int(pid_file.read_text()))
        except (OSError, ValueError):
            cpu[component] = float("nan")
    return cpu


def _apiserver_metrics() -> str:
    return subprocess.run(
        ["kubectl", f"--kubeconfig={localcluster.kubeconfig_path()}", "get", "--raw", "/metrics"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def _label(line: str, name: str) -> str:
    return line.split(f'{name}="', 1)[1].split('"', 1)[0] if f'{name}="' in line else ""


def _api_requests(out: str) -> dict[str, float]:
    """Requests the API server served, by "verb resource" (watches and their events excluded)."""
    counts: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        verb = _label(line, "verb")
        if verb in ("WATCH", "CONNECT"):
            continue
        key = f"{verb} {_label(line, 'resource')}"
        if _label(line, "subresource"):
            key += "/" + _label(line, "subresource")
        counts[key] = counts.get(key, 0.0) + float(line.split()[-1])
    return counts


def _webhook_buckets(out: str) -> dict[float, float]:
    """Cumulative counts of our webhook's admission durations, by upper bound (seconds)."""
    buckets: dict[float, float] = {}
    for line in out.splitlines():
        if not line.startswith(WEBHOOK_METRIC + "_bucket{") or "tramontane" not in line:
            continue
        if 'operation="CREATE"' not in line or 'type="validating"' not in line:
            continue
        bound = line.split('le="', 1)[1].split('"', 1)[0]
        key = float("inf") if bound == "+Inf" else float(bound)
        buckets[key] = buckets.get(key, 0.0) + float(line.split()[-1])
    return buckets


def _histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile over the increase between two scrapes (linear within a
    bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(
                count - lower_count, 1e-9
            )
        lower_bound, lower_count = bound, count
    return float("nan")


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
    """Reconciles done and their mean duration, and the admission handler's own p99 (from
    review in to decision out: the rest of the API server's figure is transport and queueing),
    from the operator's own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))

    count = value("tramontane_reconcile_duration_seconds_count")
    total = value("tramontane_reconcile_duration_seconds_sum")
    buckets: dict[float, float] = {}
    for line in lines:
        if line.startswith("tramontane_admission_duration_seconds_bucket{"):
            bound = _label(line, "le")
            key = float("inf") if bound == "+Inf" else float(bound)
            buckets[key] = buckets.get(key, 0.0) + float(line.split()[-1])
    return {
        "reconciles": count,
        "mean_reconcile_seconds": total / count if count else 0.0,
        "admission_handler_p99_ms": 1000 * _histogram_quantile({}, buckets, 0.99),
    }


def _tenant(name: str, gpus: int, deployments: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "metadata": {"name": name, "labels": {"tramontane.dev/bench": "true"}},
        "spec": {
            "namespace": name,
            "residencyPolicy": "unrestricted",
            "quota": {"gpus": gpus, "modelDeployments": deployments},
            "admins": {"groups": ["bench"]},
        },
    }


def _wait_tenants_ready(api: client.CustomObjectsApi, names: list[str]) -> None:
    deadline = time.monotonic() + 120
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            obj = cast(
                dict[str, Any], api.get_cluster_custom_object(GROUP, VERSION, "tenants", name)
            )
            conditions = obj.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                pending.discard(name)
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"tenants not Ready after 120 s: {sorted(pending)[:5]}")


def run_once(
    n: int, tenants: int, api: client.CustomObjectsApi, operator_pid: int
) -> dict[str, Any]:
    prefix = f"bench-{n}-{int(time.time())}"
    names = [f"{prefix}-{t:02d}" for t in range(tenants)]
    per_tenant = -(-n // tenants)
    # ModelDeployments live in tenant namespaces: unrestricted tenants, quota for one more (the
    # quiet phase's dry runs, below, are admitted).
    for name in names:
        api.create_cluster_custom_object(
            GROUP, VERSION, "tenants", _tenant(name, 4 * (per_tenant + 1), per_tenant + 1)
        )
    _wait_tenants_ready(api, names)
    template = yaml.safe_load((REPO / "config/samples/modeldeployment.yaml").read_text())
    created: dict[tuple[str, str], float] = {}
    reconciled: dict[tuple[str, str], float] = {}
    done = threading.Event()
    listening = threading.Event()

    def watch_status() -> None:
        stream = watch.Watch()
        listening.set()
        for event in stream.stream(
            api.list_cluster_custom_object, GROUP, VERSION, PLURAL, timeout_seconds=900
        ):
            obj = event["object"]
            meta = obj["metadata"]
            if not meta["namespace"].startswith(prefix):
                continue
            conditions = obj.get("status", {}).get("conditions", [])
            if any(c["type"] == "Reconciled" and c["status"] == "True" for c in conditions):
                reconciled.setdefault((meta["namespace"], meta["name"]), time.monotonic())
                if len(reconciled) == n:
                    stream.stop()
        done.set()

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    listening.wait(10)
    time.sleep(0.5)  # the watch is established before the first create
    metrics_before = _apiserver_metrics()
    cpu_before = _component_cpu(operator_pid)

    def create(i: int) -> None:
        namespace, name = names[i % tenants], f"md-{i:05d}"
        body = dict(template, metadata={"name": name, "namespace": namespace})
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        created[(namespace, name)] = time.monotonic()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(n)))
    create_seconds = time.monotonic() - started
    done.wait(900)
    cpu_after = _component_cpu(operator_pid)
    metrics_after = _apiserver_metrics()
    webhook_before, webhook_after = (
        _webhook_buckets(metrics_before),
        _webhook_buckets(metrics_after),
    )
    requests_before = _api_requests(metrics_before)
    requests = {
        key: round((count - requests_before.get(key, 0.0)) / n, 2)
        for key, count in _api_requests(metrics_after).items()
        if count - requests_before.get(key, 0.0) >= n / 10
    }
    latencies = [reconciled[key] - created[key] for key in created if key in reconciled]
    quiet = _quiet_webhook(api, names[0], template)
    result = {
        "n": n,
        "tenants": names,
        "reconciled": len(latencies),
        "create_seconds": create_seconds,
        "p50_seconds": _percentile(latencies, 0.5) if latencies else float("nan"),
        "p99_seconds": _percentile(latencies, 0.99) if latencies else float("nan"),
        "all_converged_seconds": (max(reconciled.values()) - started) if reconciled else None,
        "webhook_p50_ms": 1000 * _histogram_quantile(webhook_before, webhook_after, 0.5),
        "webhook_p99_ms": 1000 * _histogram_quantile(webhook_before, webhook_after, 0.99),
        "cpu_seconds": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        **quiet,
        "api_requests_per_deployment": dict(sorted(requests.items(), key=lambda kv: -kv[1])),
    }
    return result


QUIET_CREATES = 50


def _quiet_webhook(
    api: client.CustomObjectsApi, namespace: str, template: dict[str, Any]
) -> dict[str, float]:
    """The webhook's latency with the machine not saturated: once the burst has converged,
    QUIET_CREATES creates one at a time (dry runs: reviewed by the webhook, nothing kept)."""
    time.sleep(5)
    before = _webhook_buckets(_apiserver_metrics())
    body = dict(template, metadata={"name": "quiet-probe", "namespace": namespace})
    for _ in range(QUIET_CREATES):
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
    after = _webhook_buckets(_apiserver_metrics())
    return {
        "quiet_webhook_p50_ms": 1000 * _histogram_quantile(before, after, 0.5),
        "quiet_webhook_p99_ms": 1000 * _histogram_quantile(before, after, 0.99),
    }


def _cleanup(api: client.CustomObjectsApi, core: client.CoreV1Api, tenants: list[str]) -> None:
    """Delete the deployments, then the Tenants (which own the namespaces), and wait for garbage
    collection so that the next size starts on a quiet cluster. Runs while the operator is up:
    its webhook reviews a Tenant's deletion (and kopf's finalizer goes with its timer)."""
    for tenant in tenants:
        api.delete_collection_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL)
    deadline = time.monotonic() + 900
    for tenant in tenants:
        while time.monotonic() < deadline:
            listed = cast(
                dict[str, Any], api.list_namespaced_custom_object(GROUP, VERSION, tenant, PLURAL)
            )
            left = listed["items"]
            if not left:
                break
            time.sleep(1)
        api.delete_cluster_custom_object(GROUP, VERSION, "tenants", tenant)
    while time.monotonic() < deadline:
        names = {n.metadata.name for n in core.list_namespace().items if n.metadata}
        if not names & set(tenants):
            return
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--keep", action="store_true", help="keep the bench namespaces")
    parser.add_argument(
        "--tenants",
        type=int,
        default=0,
        help="tenants to spread over (default: 1 for N<=100, else 50)",
    )
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
        tenants = args.tenants or (1 if n <= 100 else 50)
        operator = _start_operator(18099, log_path)
        try:
            result = run_once(n, tenants, api, operator.pid)
            result["operator_peak_rss_mib"] = _peak_rss_mib(operator.pid)
            result |= _reconcile_stats(18099)
            _report(n, tenants, result)  # before the cleanup, which can take minutes
            results.append(result)
            if not args.keep:  # while the operator (and its webhook) still runs
                _cleanup(api, core, result["tenants"])
        finally:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
    print(json.dumps(results, indent=2))
    print(_summary(results))
    return 0


def _report(n: int, tenants: int, result: dict[str, Any]) -> None:
    cpu = result["cpu_seconds"]
    print(
        f"N={n:5d} over {tenants} tenant(s)  reconciled {result['reconciled']}/{n}  "
        f"apply→Reconciled p50 {result['p50_seconds']:.3f}s  p99 {result['p99_seconds']:.3f}s  "
        f"all created and Reconciled {result['all_converged_seconds']:.1f}s  "
        f"(creates took {result['create_seconds']:.1f}s)\n"
        f"         webhook p50 {result['webhook_p50_ms']:.1f} ms  p99 "
        f"{result['webhook_p99_ms']:.1f} ms (API server's histogram; the handler's own p99 "
        f"{result['admission_handler_p99_ms']:.1f} ms)  "
        f"operator peak RSS {result['operator_peak_rss_mib']:.0f} MiB  "
        f"({result['reconciles']:.0f} reconciles, "
        f"mean {result['mean_reconcile_seconds'] * 1000:.0f} ms)\n"
        "         CPU seconds over the run: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())
        + f"\n         webhook one create at a time after the burst "
        f"({QUIET_CREATES} dry runs): "
        f"p50 {result['quiet_webhook_p50_ms']:.1f} ms  p99 "
        f"{result['quiet_webhook_p99_ms']:.1f} ms (API server's histogram)"
        + "\n         API requests per deployment (every client): "
        + ", ".join(f"{k} {v}" for k, v in result["api_requests_per_deployment"].items()),
        flush=True,
    )


def _summary(results: list[dict[str, Any]]) -> str:
    fields: list[str] = []
    by_n = {r["n"]: r for r in results}
    if 100 in by_n:
        fields += [f"n100_p50_s={by_n[100]['p50_seconds']:.3f}",
                   f"n100_p99_s={by_n[100]['p99_seconds']:.3f}"]  # fmt: skip
    if 1000 in by_n:
        fields += [f"n1000_converge_s={by_n[1000]['all_converged_seconds']:.1f}",
                   f"n1000_p99_s={by_n[1000]['p99_seconds']:.3f}"]  # fmt: skip
    if results:
        webhook = max(r["webhook_p99_ms"] for r in results)
        fields.append(f"webhook_p99_ms={webhook:.1f}")
        fields.append(f"rss_mb={max(r['operator_peak_rss_mib'] for r in results) * 1.048576:.0f}")
    return "summary: " + " ".join(fields)


if __name__ == "__main__":
    sys.exit(main())
