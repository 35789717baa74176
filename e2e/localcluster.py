"""A local Kubernetes cluster made of real upstream binaries, run as plain processes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the KWOK controller (simulated
nodes: no kubelet, no containers) and the KubeRay operator, all built from Go modules by
e2e/build.sh, with TLS between every component and RBAC on, the way controller-runtime's envtest
runs a control plane, plus a scheduler and controllers so that pods really get placed.

    python e2e/localcluster.py up       start (or reuse a healthy running cluster)
    python e2e/localcluster.py down     stop every process of this cluster
    python e2e/localcluster.py status   exit 0 when the cluster is up and healthy
    python e2e/localcluster.py nodes [FILE]   (re)apply the simulated node set

Processes are identified by the state directory in their command line (.cluster/ in the repo by
default), so processes left over by a crashed run are found and replaced, never duplicated.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import realnode

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parent
STATE = Path(os.environ.get("TRAMONTANE_CLUSTER_DIR", REPO / ".cluster")).resolve()
CACHE = Path(os.environ.get("TRAMONTANE_CACHE", Path.home() / ".cache" / "tramontane"))
NODES_FILE = E2E_DIR / "nodes.yaml"

PORTS = {
    "etcd": int(os.environ.get("TRAMONTANE_ETCD_PORT", "12379")),
    "etcd-peer": int(os.environ.get("TRAMONTANE_ETCD_PEER_PORT", "12380")),
    "kube-apiserver": int(os.environ.get("TRAMONTANE_APISERVER_PORT", "16443")),
    "kube-controller-manager": int(os.environ.get("TRAMONTANE_KCM_PORT", "17257")),
    "kube-scheduler": int(os.environ.get("TRAMONTANE_SCHEDULER_PORT", "17259")),
    "kwok": int(os.environ.get("TRAMONTANE_KWOK_PORT", "17247")),
    "kuberay-metrics": int(os.environ.get("TRAMONTANE_KUBERAY_METRICS_PORT", "17080")),
    "kuberay": int(os.environ.get("TRAMONTANE_KUBERAY_PROBE_PORT", "17082")),
}
SERVICE_CIDR = "10.96.0.0/16"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# "node": the simulated fleet plus a real node whose pods run (e2e/realnode.py), all in the
# network namespace of e2e/netns.sh; needs root. "kwok": the simulated fleet only, on loopback.
PROFILE = os.environ.get("TRAMONTANE_CLUSTER_PROFILE") or ("node" if os.geteuid() == 0 else "kwok")
if PROFILE not in ("node", "kwok"):
    raise SystemExit(f"TRAMONTANE_CLUSTER_PROFILE={PROFILE!r}: expected 'node' or 'kwok'")
REAL_NODE = PROFILE == "node"
NODE_COMPONENTS = ["containerd", "kubelet", "kube-proxy", "coredns"]
# Start order; stopped in reverse (the real node's pods are removed first, see stop_all).
COMPONENTS = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    *(NODE_COMPONENTS if REAL_NODE else []),
    "kwok",
    "kuberay",
]
ALL_COMPONENTS = [*COMPONENTS, *(c for c in NODE_COMPONENTS if c not in COMPONENTS)]


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


class ClusterError(RuntimeError):
    """A prerequisite is missing or a component failed to become healthy."""


def versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (E2E_DIR / "versions.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key] = value
    return pins


# Cache directory (e2e/build.sh's `<name>-<version>`) → the versions.env pin of its version.
CONTROL_PLANE_ARTIFACTS = {
    "etcd": "ETCD_VERSION",
    "kubernetes": "KUBERNETES_VERSION",
    "kwok": "KWOK_VERSION",
    "kuberay": "KUBERAY_VERSION",
    "prometheus-operator-crds": "PROMETHEUS_OPERATOR_VERSION",
    "helm": "HELM_VERSION",
}
NODE_ARTIFACTS = {
    "containerd": "CONTAINERD_VERSION",
    "runc": "RUNC_VERSION",
    "crictl": "CRICTL_VERSION",
    "cni-plugins": "CNI_PLUGINS_VERSION",
    "kubelet": "KUBERNETES_VERSION",
    "coredns": "COREDNS_VERSION",
}


def _cache_dirs(artifacts: dict[str, str]) -> dict[str, Path]:
    pins = versions()
    return {name: CACHE / f"{name}-{pins[pin]}" for name, pin in artifacts.items()}


def artifact_dirs() -> dict[str, Path]:
    """What this profile's cluster runs, in the cache."""
    return _cache_dirs({**CONTROL_PLANE_ARTIFACTS, **(NODE_ARTIFACTS if REAL_NODE else {})})


def node_artifact_dirs() -> dict[str, Path]:
    return _cache_dirs(NODE_ARTIFACTS)


# --------------------------------------------------------------------------------------- PKI


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


# The user KubeRay's client certificate names (RBAC and the chart's guard policies know it by it).
KUBERAY_USER = "kuberay-operator"


@dataclass(frozen=True)
class CertSpec:
    name: str
    common_name: str
    organization: str | None = None
    server_names: tuple[str, ...] = ()  # DNS names and IPs for serving certificates


PKI_FORMAT = "2"  # bump when a certificate's names change: the PKI is then made anew


def _cert_specs() -> list[CertSpec]:
    api_names = (
        "localhost",
        "127.0.0.1",
        realnode.NODE_IP,
        "10.96.0.1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    )
    return [
        CertSpec("etcd-server", "etcd", server_names=("localhost", "127.0.0.1")),
        CertSpec("etcd-client", "kube-apiserver-etcd-client"),
        CertSpec("kube-apiserver", "kube-apiserver", server_names=api_names),
        CertSpec("kwok-server", "kwok", server_names=("localhost", "127.0.0.1")),
        # Clients. The built-in RBAC bootstrap policy grants the control-plane identities.
        CertSpec("admin", "tramontane-admin", "system:masters"),
        CertSpec("kube-controller-manager", "system:kube-controller-manager"),
        CertSpec("kube-scheduler", "system:kube-scheduler"),
        # KWOK stands in for every kubelet, it writes node and pod status cluster-wide.
        CertSpec("kwok", "kwok-controller", "system:masters"),
        # KubeRay gets only its upstream ClusterRole (bound in _install_addons).
        CertSpec("kuberay", KUBERAY_USER),
        # The real node. The Node authorizer and NodeRestriction confine the kubelet to its own
        # node and pods; the bootstrap policy grants system:kube-proxy what kube-proxy needs.
        CertSpec("node", f"system:node:{realnode.NODE_NAME}", "system:nodes"),
        CertSpec("kubelet-serving", realnode.NODE_NAME, server_names=(realnode.NODE_IP,)),
        CertSpec(
            "kube-apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        ),
        CertSpec("kube-proxy", "system:kube-proxy"),
        CertSpec("coredns", "coredns"),
    ]


def ensure_pki() -> Path:
    pki = STATE / "pki"
    format_file = pki / "FORMAT"
    made_as = format_file.read_text().strip() if format_file.exists() else None
    if pki.is_dir() and made_as != PKI_FORMAT:
        shutil.rmtree(pki)  # an older layout: its certificates lack names now needed
    pki.mkdir(parents=True, exist_ok=True)
    format_file.write_text(PKI_FORMAT + "\n")
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    if not ca_crt.exists():
        _openssl("genrsa", "-out", str(ca_key), "2048")
        _openssl(
            "req", "-x509", "-new", "-key", str(ca_key), "-days", "3650",
            "-subj", "/CN=tramontane-local-ca", "-out", str(ca_crt),
        )  # fmt: skip
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    for spec in _cert_specs():
        crt, key = pki / f"{spec.name}.crt", pki / f"{spec.name}.key"
        if crt.exists():
            continue
        subject = f"/CN={spec.common_name}" + (
            f"/O={spec.organization}" if spec.organization else ""
        )
        ext = pki / f"{spec.name}.ext"
        if spec.server_names:
            alt = ",".join(
                f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in spec.server_names
            )
            ext.write_text(f"subjectAltName={alt}\nextendedKeyUsage=serverAuth,clientAuth\n")
        else:
            ext.write_text("extendedKeyUsage=clientAuth\n")
        csr = pki / f"{spec.name}.csr"
        _openssl("genrsa", "-out", str(key), "2048")
        _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "3650", "-extfile", str(ext), "-out", str(crt),
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
    for key_file in pki.glob("*.key"):
        key_file.chmod(0o600)
    return pki


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, user: str) -> None:
    pki = STATE / "pki"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tramontane-local",
                "cluster": {
                    "server": f"https://127.0.0.1:{PORTS['kube-apiserver']}",
                    "certificate-authority-data": _b64(pki / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{user}.crt"),
                    "client-key-data": _b64(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "tramontane-local", "context": {"cluster": "tramontane-local", "user": user}}
        ],
        "current-context": "tramontane-local",
    }
    realnode.write_if_changed(path, yaml.safe_dump(config))  # running components keep theirs
    path.chmod(0o600)


def kubeconfig_path() -> Path:
    return STATE / "kubeconfig"


# --------------------------------------------------------------------------------- processes


def _read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def our_processes() -> dict[str, list[int]]:
    """Every live process whose command line names this cluster's state directory."""
    marker = str(STATE) + "/"
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmdline = _read_cmdline(pid)
        if not cmdline or not any(marker in part for part in cmdline[1:]):
            continue
        binary = Path(cmdline[0]).name
        component = {"ray-operator": "kuberay"}.get(binary, binary)
        if component in ALL_COMPONENTS:
            found.setdefault(component, []).append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_all() -> None:
    """Stop every process of this cluster; with a real node, also its containers, mounts,
    cgroups and the kernel settings the kubelet changed, so a crashed run leaves nothing."""
    processes = our_processes()
    if processes.get("kubelet"):
        # First, or it would restart the pods removed next.
        _terminate(processes.pop("kubelet"))
    if (STATE / "node").is_dir():
        realnode.remove_pods(STATE, node_artifact_dirs())
    pids: list[int] = []
    operator_pid = STATE / "run" / "operator.pid"  # started by e2e/demo.sh
    if operator_pid.exists() and _alive(pid := int(operator_pid.read_text())):
        log(f"stopping the demo operator (pid {pid})")
        pids.append(pid)
    for component in reversed(ALL_COMPONENTS):
        for pid in processes.get(component, []):
            log(f"stopping {component} (pid {pid})")
            pids.append(pid)
    _terminate(pids)
    if (STATE / "node").is_dir():
        # What CRI could not remove (containerd had died): kill what is left, then clean up.
        _terminate(realnode.shim_pids(STATE) + realnode.pod_pids())
        realnode.unmount_under(STATE / "node")
        realnode.remove_pod_cgroups()
        realnode.restore_sysctls(STATE)
    for pid_file in (STATE / "run").glob("*.pid"):
        pid_file.unlink()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _raise_open_files(pid: int) -> None:
    """containerd, its shims and containers want many descriptors (the hard limit here is 20000,
    not 65536); raised right after the start, before any shim is forked."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (wanted, hard))


def _spawn(component: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    logs = STATE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (STATE / "run").mkdir(parents=True, exist_ok=True)
    with (logs / f"{component}.log").open("ab") as log_file:
        log_file.write(f"\n==== {time.strftime('%F %T')} starting {component}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `make cluster`; stopped by `down`
            env={**os.environ, **(env or {})},
            cwd=STATE,
        )
    if component == "containerd":
        _raise_open_files(process.pid)
    (STATE / "run" / f"{component}.pid").write_text(str(process.pid))
    return process.pid


# ------------------------------------------------------------------------------ health checks


def _https_ok(url: str, client: str | None = None, verify: bool = True) -> bool:
    pki = STATE / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client:
        context.load_cert_chain(pki / f"{client}.crt", pki / f"{client}.key")
    try:
        with urllib.request.urlopen(url, context=context, timeout=3) as response:  # noqa: S310 (https only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (http only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _containerd_ok() -> bool:
    socket_path = realnode.containerd_socket(STATE)
    if not socket_path.exists():
        return False
    result = subprocess.run(
        [str(artifact_dirs()["containerd"] / "ctr"), f"--address={socket_path}", "version"],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return result.returncode == 0


HEALTH: dict[str, Callable[[], bool]] = {
    "etcd": lambda: _https_ok(f"https://127.0.0.1:{PORTS['etcd']}/health", "etcd-client"),
    "kube-apiserver": lambda: _https_ok(
        f"https://127.0.0.1:{PORTS['kube-apiserver']}/readyz", "admin"
    ),
    "kube-controller-manager": lambda: _https_ok(
        f"https://127.0.0.1:{PORTS['kube-controller-manager']}/healthz", verify=False
    ),
    "kube-scheduler": lambda: _https_ok(
        f"https://127.0.0.1:{PORTS['kube-scheduler']}/healthz", verify=False
    ),
    "kwok": lambda: _https_ok(f"https://127.0.0.1:{PORTS['kwok']}/healthz", verify=False),
    "kuberay": lambda: _http_ok(f"http://127.0.0.1:{PORTS['kuberay']}/readyz"),
    "containerd": _containerd_ok,
    "kubelet": lambda: _http_ok(f"http://127.0.0.1:{realnode.KUBELET_HEALTHZ_PORT}/healthz"),
    "kube-proxy": lambda: _http_ok(f"http://127.0.0.1:{realnode.KUBE_PROXY_HEALTHZ_PORT}/livez"),
    "coredns": lambda: _http_ok(f"http://127.0.0.1:{realnode.COREDNS_HEALTH_PORT}/health"),
}


def _wait(what: str, check: Callable[[], bool], timeout: float, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not _alive(pid):
            raise ClusterError(
                f"{what} exited during start-up; see {STATE / 'logs' / (what + '.log')}"
            )
        time.sleep(0.25)
    raise ClusterError(
        f"{what} was not healthy after {timeout:.0f}s; see {STATE / 'logs' / (what + '.log')}"
    )


# ------------------------------------------------------------------------------- components


def _argv(component: str) -> tuple[list[str], dict[str, str]]:  # noqa: PLR0911 (one per component)
    art = artifact_dirs()
    pki = STATE / "pki"
    if component == "etcd":
        client, peer = (
            f"https://127.0.0.1:{PORTS['etcd']}",
            f"https://127.0.0.1:{PORTS['etcd-peer']}",
        )
        return [
            str(art["etcd"] / "etcd"),
            "--name=local",
            f"--data-dir={STATE / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            f"--cert-file={pki / 'etcd-server.crt'}",
            f"--key-file={pki / 'etcd-server.key'}",
            f"--trusted-ca-file={pki / 'ca.crt'}",
            "--client-cert-auth=true",
            f"--peer-cert-file={pki / 'etcd-server.crt'}",
            f"--peer-key-file={pki / 'etcd-server.key'}",
            f"--peer-trusted-ca-file={pki / 'ca.crt'}",
            "--peer-client-cert-auth=true",
            # A throw-away test cluster: durability across power loss is not worth the fsyncs.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ], {}
    if component == "kube-apiserver":
        return [
            str(art["kubernetes"] / "kube-apiserver"),
            f"--etcd-servers=https://127.0.0.1:{PORTS['etcd']}",
            f"--etcd-cafile={pki / 'ca.crt'}",
            f"--etcd-certfile={pki / 'etcd-client.crt'}",
            f"--etcd-keyfile={pki / 'etcd-client.key'}",
            *_apiserver_network_flags(),
            f"--secure-port={PORTS['kube-apiserver']}",
            f"--tls-cert-file={pki / 'kube-apiserver.crt'}",
            f"--tls-private-key-file={pki / 'kube-apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--cert-dir={STATE / 'apiserver-certs'}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ], {}
    if component == "kube-controller-manager":
        kubeconfig = STATE / "kube-controller-manager.kubeconfig"
        return [
            str(art["kubernetes"] / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={PORTS['kube-controller-manager']}",
            f"--cert-dir={STATE / 'kube-controller-manager-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ], {}
    if component == "kube-scheduler":
        kubeconfig = STATE / "kube-scheduler.kubeconfig"
        return [
            str(art["kubernetes"] / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={PORTS['kube-scheduler']}",
            f"--cert-dir={STATE / 'kube-scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ], {}
    if component == "kwok":
        return [
            str(art["kwok"] / "kwok"),
            f"--kubeconfig={STATE / 'kwok.kubeconfig'}",
            f"--config={art['kwok'] / 'stages.yaml'}",
            # Only nodes we declare are simulated; a node without the annotation is left alone.
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{PORTS['kwok']}",
            f"--tls-cert-file={pki / 'kwok-server.crt'}",
            f"--tls-private-key-file={pki / 'kwok-server.key'}",
        ], {}
    if component in NODE_COMPONENTS:
        return realnode.argv(component, STATE, artifact_dirs())
    if component == "kuberay":
        return [
            str(art["kuberay"] / "ray-operator"),
            f"--metrics-addr=127.0.0.1:{PORTS['kuberay-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{PORTS['kuberay']}",
            "--enable-leader-election=false",
            # The operator runs outside the cluster network: reach Ray heads via the API server.
            "--use-kubernetes-proxy",
            f"--log-file-path={STATE / 'logs' / 'kuberay-operator.json'}",
            "--log-stdout-encoder=console",
        ], {"KUBECONFIG": str(STATE / "kuberay.kubeconfig")}
    raise ValueError(component)


def _apiserver_network_flags() -> list[str]:
    if not REAL_NODE:
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # No kubelet registers, so nothing could serve the kubernetes Service's endpoints.
            "--endpoint-reconciler-type=none",
        ]
    pki = STATE / "pki"
    return [
        # All addresses of the cluster's network namespace (its loopback and the node's bridge);
        # pods reach it as the kubernetes Service, whose endpoint is the advertised address.
        "--bind-address=0.0.0.0",  # a namespace of our own, with no route out
        f"--advertise-address={realnode.NODE_IP}",
        # logs, exec and port-forward: the API server calls the kubelet, and checks its cert.
        f"--kubelet-client-certificate={pki / 'kube-apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'kube-apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        # The service proxy (KubeRay reaches Ray dashboards through it) dials endpoints, not
        # ClusterIPs.
        "--enable-aggregator-routing=true",
    ]


def kubectl(*args: str, input_text: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig_path()}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


IMAGES = ("pause", "operator", "serving")  # what `make images` builds (e2e/images.sh)


def import_images() -> None:
    """Import the images `make images` built (OCI archives) into the node's containerd: a kubelet
    cannot read an archive, and no registry serves them here. An image is imported again when
    its archive changed (the archive's name carries the hash of its inputs). Only the pause image
    is required (every pod's sandbox); the others are imported once `make images` built them."""
    ctr = [
        str(artifact_dirs()["containerd"] / "ctr"),
        f"--address={realnode.containerd_socket(STATE)}",
        "--namespace=k8s.io",
    ]
    listed = subprocess.run(
        [*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True
    )
    present = set(listed.stdout.split())
    record = STATE / "node" / "imported-images.json"
    imported: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    for name in IMAGES:
        archive = Path(
            subprocess.run(
                [str(E2E_DIR / "images.sh"), "path", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        reference = f"docker.io/tramontane/{name}:dev"
        if reference in present and imported.get(reference) == archive.name:
            continue
        if not archive.exists():
            if name == "pause":
                raise ClusterError(f"the pause image is not built ({archive}): run `make images`")
            log(f"{reference} is not built ({archive.name}); `make images` builds it")
            continue
        started = time.monotonic()
        # --local --discard-unpacked-layers: the compressed layers (3.4 GB for serving) are
        # dropped once unpacked into the snapshotter; the CRI needs only the snapshots. Without
        # --base-name, umoci's bare tag would import unnamed.
        base_name = f"--base-name=docker.io/tramontane/{name}"
        command = [*ctr, "images", "import", "--local", "--discard-unpacked-layers", base_name]
        result = subprocess.run(
            [*command, str(archive)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"importing {archive} failed: {result.stderr.strip()}")
        imported[reference] = archive.name
        record.write_text(json.dumps(imported, indent=2) + "\n")
        log(f"imported {reference} into the node's containerd ({time.monotonic() - started:.0f}s)")


def _install_addons() -> None:
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


# ------------------------------------------------------------------------------------ nodes


def node_manifest(node: dict[str, Any], pool: dict[str, Any]) -> dict[str, Any]:
    """A KWOK-managed Node with the labels, capacity and taints of a real node of that pool."""
    labels = {
        "kubernetes.io/hostname": node["name"],
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": pool["instanceType"],
        "topology.kubernetes.io/region": node["region"],
        "topology.kubernetes.io/zone": node["zone"],
        "type": "kwok",
    }
    capacity = {"cpu": pool["cpu"], "memory": pool["memory"], "pods": pool["pods"]}
    taints: list[dict[str, str]] = []
    gpus = int(pool.get("gpus", 0))
    if gpus:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": pool["gpuProduct"],
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(pool["gpuMemoryMiB"]),
        }
        capacity["nvidia.com/gpu"] = str(gpus)
        taints.append(dict(GPU_TAINT))
    labels |= node.get("labels", {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node["name"],
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def load_nodes(path: Path = NODES_FILE) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    pools = data["pools"]
    return [node_manifest(node, pools[node["pool"]]) for node in data["nodes"]]


def apply_nodes(path: Path = NODES_FILE, timeout: float = 60) -> list[str]:
    nodes = load_nodes(path)
    kubectl(
        "apply",
        "--server-side",
        "--field-manager=tramontane-localcluster",
        # A restart on the kept etcd finds the nodes tainted unreachable by the node lifecycle
        # controller while the cluster was down: the fleet file's taints win (kwok makes the
        # nodes Ready again and the controller lifts its own taints).
        "--force-conflicts",
        "-f",
        "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}),
    )
    names = [node["metadata"]["name"] for node in nodes]
    kubectl(
        "wait", "--for=condition=Ready", f"--timeout={int(timeout)}s", *(f"node/{n}" for n in names)
    )
    return names


# ------------------------------------------------------------------------------- up / down


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


def healthy() -> bool:
    processes = our_processes()
    return all(
        len(processes.get(component, [])) == 1 and HEALTH[component]() for component in COMPONENTS
    )


COMPONENT_PORTS = {
    "etcd": ("etcd", "etcd-peer"),
    "kube-apiserver": ("kube-apiserver",),
    "kube-controller-manager": ("kube-controller-manager",),
    "kube-scheduler": ("kube-scheduler",),
    "kwok": ("kwok",),
    "kuberay": ("kuberay", "kuberay-metrics"),
    "containerd": (),
    "kubelet": (),
    "kube-proxy": (),
    "coredns": (),
}


def _terminate(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def stop(component: str, kill: bool = False) -> None:
    """Stop one component (SIGKILL with `kill`, as a crash; else SIGTERM), for fault tests;
    `up()` starts it again and keeps the others."""
    pids = our_processes().get(component, [])
    if kill:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while any(_alive(p) for p in pids):
            time.sleep(0.1)
    else:
        _terminate(pids)


def start(component: str) -> None:
    """Start one stopped component and wait until it is healthy, leaving the others alone (fault
    tests: an API server restarted keeps its etcd, an etcd restarted keeps its API server)."""
    if len(our_processes().get(component, [])) == 1 and HEALTH[component]():
        return
    deadline = time.monotonic() + 15
    while any(_port_in_use(PORTS[name]) for name in COMPONENT_PORTS[component]):
        if time.monotonic() > deadline:
            raise ClusterError(f"{component}'s ports are still in use 15 s after it stopped")
        time.sleep(0.2)
    argv, env = _argv(component)
    pid = _spawn(component, argv, env)
    _wait(component, HEALTH[component], timeout=90, pid=pid)
    log(f"{component} healthy (pid {pid})")


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
    processes = our_processes()
    to_start = [c for c in COMPONENTS if not (len(processes.get(c, [])) == 1 and HEALTH[c]())]
    for component in to_start:
        if pids := processes.get(component, []):
            log(f"replacing {component}: {len(pids)} stale process(es) {pids}")
            _terminate(pids)
    # Check every port before starting anything, so a conflict leaves nothing half-started.
    busy = [
        f"{PORTS[name]} ({name})"
        for component in to_start
        for name in COMPONENT_PORTS[component]
        if _port_in_use(PORTS[name])
    ]
    if busy:
        raise ClusterError(
            f"port(s) {', '.join(busy)} in use by processes that are not this cluster's. Stop "
            "them or pick other ports with the TRAMONTANE_*_PORT variables (see PORTS in "
            "e2e/localcluster.py)."
        )
    restarted: list[str] = []
    addons_installed = False
    for component in to_start:
        if component in ("containerd", "kwok") and not addons_installed:
            _install_addons()  # CoreDNS's and KubeRay's RBAC, before they start
            addons_installed = True
        if component == "kubelet":
            realnode.save_sysctls(STATE)
        argv, env = _argv(component)
        pid = _spawn(component, argv, env)
        _wait(component, HEALTH[component], timeout=90, pid=pid)
        log(f"{component} healthy (pid {pid}, {time.monotonic() - started:.1f}s)")
        restarted.append(component)
        if component == "containerd":
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
    _wait(
        "kube-controller-manager",
        lambda: bool(kubectl("get", "serviceaccount", "default", "-n", "default", check=False)),
        timeout=60,
    )
    log(f"cluster up in {time.monotonic() - started:.1f}s; export KUBECONFIG={kubeconfig_path()}")


def status() -> bool:
    processes = our_processes()
    ok = True
    for component in COMPONENTS:
        pids = processes.get(component, [])
        state = "healthy" if len(pids) == 1 and HEALTH[component]() else "down"
        if len(pids) > 1:
            state = f"duplicated {pids}"
        ok &= state == "healthy"
        print(f"{component:24} {state:10} {' '.join(map(str, pids))}")
    return ok


def iter_node_rows() -> Iterator[str]:
    columns = (
        "NAME:.metadata.name,REGION:.metadata.labels.topology\\.kubernetes\\.io/region,"
        "ZONE:.metadata.labels.topology\\.kubernetes\\.io/zone,"
        "GPU:.metadata.labels.nvidia\\.com/gpu\\.product,"
        "GPUS:.status.allocatable.nvidia\\.com/gpu,"
        "READY:.status.conditions[?(@.type=='Ready')].status"
    )
    yield from kubectl("get", "nodes", "-o", f"custom-columns={columns}").splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    nodes = sub.add_parser("nodes")
    nodes.add_argument("file", nargs="?", type=Path, default=NODES_FILE)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            stop_all()
            log("stopped")
        elif args.command == "status":
            return 0 if status() else 1
        elif args.command == "nodes":
            apply_nodes(args.file)
            for row in iter_node_rows():
                print(row)
    except ClusterError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
