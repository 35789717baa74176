"""Up and down: the whole cluster, or one component (fault tests), and its status."""

from __future__ import annotations

import json
import shutil
import time

import realnode
from cluster import processes
from cluster.base import (
    REAL_NODE,
    STATE,
    ClusterError,
    artifact_dirs,
    kubeconfig_path,
    kubectl,
    log,
    node_artifact_dirs,
)
from cluster.components import ALL_COMPONENTS, COMPONENTS, Component, component
from cluster.nodes import apply_nodes, import_images
from cluster.pki import KUBERAY_USER, ensure_pki, write_kubeconfig


def our_processes() -> dict[str, list[int]]:
    """Every live process of this cluster (its state directory is in their command line), by
    component name."""
    return processes.find({c.executable: c.name for c in ALL_COMPONENTS})


def _running_healthy(each: Component, found: dict[str, list[int]]) -> bool:
    return len(found.get(each.name, [])) == 1 and each.healthy()


def healthy() -> bool:
    found = our_processes()
    return all(_running_healthy(each, found) for each in COMPONENTS)


def _start(each: Component) -> int:
    """Spawn it and wait until it is healthy; its pid."""
    argv, env = each.command()
    pid = processes.spawn(each.name, argv, env)
    if each.spawned:
        each.spawned(pid)
    processes.wait(each.name, each.healthy, timeout=90, pid=pid)
    return pid


def stop_all() -> None:
    """Stop every process of this cluster; with a real node, also its containers, mounts,
    cgroups and the kernel settings the kubelet changed, so a crashed run leaves nothing."""
    found = our_processes()
    if found.get("kubelet"):
        # First, or it would restart the pods removed next.
        processes.terminate(found.pop("kubelet"))
    if (STATE / "node").is_dir():
        realnode.remove_pods(STATE, node_artifact_dirs())
    pids: list[int] = []
    operator_pid = STATE / "run" / "operator.pid"  # started by e2e/demo.sh
    if operator_pid.exists() and processes.alive(pid := int(operator_pid.read_text())):
        log(f"stopping the demo operator (pid {pid})")
        pids.append(pid)
    for each in reversed(ALL_COMPONENTS):
        for pid in found.get(each.name, []):
            log(f"stopping {each.name} (pid {pid})")
            pids.append(pid)
    processes.terminate(pids)
    if (STATE / "node").is_dir():
        # What CRI could not remove (containerd had died): kill what is left, then clean up.
        processes.terminate(realnode.shim_pids(STATE) + realnode.pod_pids())
        realnode.unmount_under(STATE / "node")
        realnode.remove_pod_cgroups()
        realnode.restore_sysctls(STATE)
    for pid_file in (STATE / "run").glob("*.pid"):
        pid_file.unlink()


def stop(name: str, kill: bool = False) -> None:
    """Stop one component (SIGKILL with `kill`, as a crash; else SIGTERM), for fault tests;
    `up()` starts it again and keeps the others."""
    pids = our_processes().get(name, [])
    if kill:
        processes.kill(pids)
    else:
        processes.terminate(pids)


def start(name: str) -> None:
    """Start one stopped component and wait until it is healthy, leaving the others alone (fault
    tests: an API server restarted keeps its etcd, an etcd restarted keeps its API server)."""
    each = component(name)
    if _running_healthy(each, our_processes()):
        return
    deadline = time.monotonic() + 15
    while any(processes.port_in_use(port) for port in each.ports.values()):
        if time.monotonic() > deadline:
            raise ClusterError(f"{name}'s ports are still in use 15 s after it stopped")
        time.sleep(0.2)
    pid = _start(each)
    log(f"{name} healthy (pid {pid})")


def _check_prerequisites() -> None:
    missing = [tool for tool in ("openssl", "kubectl") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"required tools not on PATH: {', '.join(missing)}")
    if REAL_NODE:
        try:
            realnode.check_prerequisites()
        except realnode.NodeError as error:
            raise ClusterError(str(error)) from None
    for name, directory in artifact_dirs().items():
        if not directory.is_dir():
            raise ClusterError(
                f"{name} is not built ({directory} missing): run `make cluster` or e2e/build.sh"
            )


def install_addons() -> None:
    """CRDs our tests apply (KubeRay, prometheus-operator) and KubeRay's upstream RBAC."""
    art = artifact_dirs()
    manifests = sorted((art["kuberay"] / "crds").glob("*.yaml")) + sorted(
        art["prometheus-operator-crds"].glob("*.yaml")
    )
    for manifest in manifests:
        # Server-side apply: these CRDs are too large for the last-applied annotation.
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifest))
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(art["kuberay"] / "rbac" / "role.yaml"),
    )
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kuberay-operator"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "kuberay-operator",
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBERAY_USER}
        ],
    }
    kubectl("apply", "--server-side", "-f", "-", input_text=json.dumps(binding))
    if REAL_NODE:
        kubectl(
            "apply",
            "--server-side",
            "-f",
            "-",
            input_text=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": realnode.coredns_rbac()}
            ),
        )
    kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/rayclusters.ray.io", "crd/rayservices.ray.io", "crd/rayjobs.ray.io",
        "crd/podmonitors.monitoring.coreos.com", "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    )  # fmt: skip


def up() -> None:
    """Start every component that is not running exactly once and healthy; keep the others."""
    _check_prerequisites()
    started = time.monotonic()
    pki = ensure_pki()
    write_kubeconfig(kubeconfig_path(), "admin")
    users = ["kube-controller-manager", "kube-scheduler", "kwok", "kuberay"]
    if REAL_NODE:
        users += ["node", "kube-proxy", "coredns"]
        realnode.write_configs(STATE, pki, artifact_dirs())
    for user in users:
        write_kubeconfig(STATE / f"{user}.kubeconfig", user)
    found = our_processes()
    to_start = [each for each in COMPONENTS if not _running_healthy(each, found)]
    for each in to_start:
        if pids := found.get(each.name, []):
            log(f"replacing {each.name}: {len(pids)} stale process(es) {pids}")
            processes.terminate(pids)
    # Check every port before starting anything, so a conflict leaves nothing half-started.
    busy = [
        f"{port} ({name})"
        for each in to_start
        for name, port in each.ports.items()
        if processes.port_in_use(port)
    ]
    if busy:
        raise ClusterError(
            f"port(s) {', '.join(busy)} in use by processes that are not this cluster's. Stop "
            "them or pick other ports with the TRAMONTANE_*_PORT variables (see "
            "e2e/cluster/components.py)."
        )
    restarted: list[str] = []
    addons_installed = False
    for each in to_start:
        if each.name in ("containerd", "kwok") and not addons_installed:
            install_addons()  # CoreDNS's and KubeRay's RBAC, before they start
            addons_installed = True
        if each.name == "kubelet":
            realnode.save_sysctls(STATE)
        pid = _start(each)
        log(f"{each.name} healthy (pid {pid}, {time.monotonic() - started:.1f}s)")
        restarted.append(each.name)
        if each.name == "containerd":
            import_images()
    names = apply_nodes()  # idempotent; picks up an edited e2e/nodes.yaml
    if REAL_NODE:
        import_images()  # those built since containerd started
        kubectl("wait", "--for=condition=Ready", "--timeout=90s", f"node/{realnode.NODE_NAME}")
        names.append(realnode.NODE_NAME)
    if not restarted:
        log(f"already running and healthy (state in {STATE}); reusing it")
        return
    log(f"{len(names)} nodes Ready ({time.monotonic() - started:.1f}s)")
    # Service-account tokens work once the token controller has created the default accounts.
    processes.wait(
        "kube-controller-manager",
        lambda: bool(kubectl("get", "serviceaccount", "default", "-n", "default", check=False)),
        timeout=60,
    )
    log(f"cluster up in {time.monotonic() - started:.1f}s; export KUBECONFIG={kubeconfig_path()}")


def status() -> bool:
    """One line per component (healthy, down or duplicated, and its pids); True when all are
    healthy."""
    found = our_processes()
    ok = True
    for each in COMPONENTS:
        pids = found.get(each.name, [])
        state = "healthy" if _running_healthy(each, found) else "down"
        if len(pids) > 1:
            state = f"duplicated {pids}"
        ok &= state == "healthy"
        print(f"{each.name:24} {state:10} {' '.join(map(str, pids))}")
    return ok
