"""One `Component` per process of the cluster: its binary, command line, ports and health check.

The control plane is envtest's (etcd, kube-apiserver) plus kube-controller-manager and
kube-scheduler so that pods really get placed, the KWOK controller (simulated nodes) and the
KubeRay operator; the "node" profile adds a real node (e2e/realnode.py: containerd, kubelet,
kube-proxy, CoreDNS). Ports come from TRAMONTANE_*_PORT variables, defaults below.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import realnode
from cluster.base import REAL_NODE, STATE, artifact_dirs
from cluster.processes import http_ok, https_ok


def _port(variable: str, default: int) -> int:
    return int(os.environ.get(variable, str(default)))


ETCD_PORT = _port("TRAMONTANE_ETCD_PORT", 12379)
ETCD_PEER_PORT = _port("TRAMONTANE_ETCD_PEER_PORT", 12380)
APISERVER_PORT = _port("TRAMONTANE_APISERVER_PORT", 16443)
KCM_PORT = _port("TRAMONTANE_KCM_PORT", 17257)
SCHEDULER_PORT = _port("TRAMONTANE_SCHEDULER_PORT", 17259)
KWOK_PORT = _port("TRAMONTANE_KWOK_PORT", 17247)
KUBERAY_METRICS_PORT = _port("TRAMONTANE_KUBERAY_METRICS_PORT", 17080)
KUBERAY_PROBE_PORT = _port("TRAMONTANE_KUBERAY_PROBE_PORT", 17082)
SERVICE_CIDR = "10.96.0.0/16"

Command = tuple[list[str], dict[str, str]]  # argv, and environment added to this process's


@dataclass(frozen=True)
class Component:
    """A process of the cluster. `command` and `healthy` are called when it starts."""

    name: str
    command: Callable[[], Command]
    healthy: Callable[[], bool]
    ports: Mapping[str, int] = field(default_factory=dict)  # what it listens on, by name
    binary: str = ""  # its executable's file name, when not `name`
    spawned: Callable[[int], None] | None = None  # called with its pid right after the start

    @property
    def executable(self) -> str:
        return self.binary or self.name


def _etcd() -> Command:
    art, pki = artifact_dirs(), STATE / "pki"
    client, peer = f"https://127.0.0.1:{ETCD_PORT}", f"https://127.0.0.1:{ETCD_PEER_PORT}"
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


def _kube_apiserver() -> Command:
    art, pki = artifact_dirs(), STATE / "pki"
    return [
        str(art["kubernetes"] / "kube-apiserver"),
        f"--etcd-servers=https://127.0.0.1:{ETCD_PORT}",
        f"--etcd-cafile={pki / 'ca.crt'}",
        f"--etcd-certfile={pki / 'etcd-client.crt'}",
        f"--etcd-keyfile={pki / 'etcd-client.key'}",
        *_apiserver_network_flags(),
        f"--secure-port={APISERVER_PORT}",
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


def _kube_controller_manager() -> Command:
    art, pki = artifact_dirs(), STATE / "pki"
    kubeconfig = STATE / "kube-controller-manager.kubeconfig"
    return [
        str(art["kubernetes"] / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={KCM_PORT}",
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


def _kube_scheduler() -> Command:
    kubeconfig = STATE / "kube-scheduler.kubeconfig"
    return [
        str(artifact_dirs()["kubernetes"] / "kube-scheduler"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={SCHEDULER_PORT}",
        f"--cert-dir={STATE / 'kube-scheduler-certs'}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ], {}


def _kwok() -> Command:
    art, pki = artifact_dirs(), STATE / "pki"
    return [
        str(art["kwok"] / "kwok"),
        f"--kubeconfig={STATE / 'kwok.kubeconfig'}",
        f"--config={art['kwok'] / 'stages.yaml'}",
        # Only nodes we declare are simulated; a node without the annotation is left alone.
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--node-lease-duration-seconds=40",
        "--cidr=10.244.0.0/16",
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{KWOK_PORT}",
        f"--tls-cert-file={pki / 'kwok-server.crt'}",
        f"--tls-private-key-file={pki / 'kwok-server.key'}",
    ], {}


def _kuberay() -> Command:
    return [
        str(artifact_dirs()["kuberay"] / "ray-operator"),
        f"--metrics-addr=127.0.0.1:{KUBERAY_METRICS_PORT}",
        f"--health-probe-bind-address=127.0.0.1:{KUBERAY_PROBE_PORT}",
        "--enable-leader-election=false",
        # The operator runs outside the cluster network: reach Ray heads via the API server.
        "--use-kubernetes-proxy",
        f"--log-file-path={STATE / 'logs' / 'kuberay-operator.json'}",
        "--log-stdout-encoder=console",
    ], {"KUBECONFIG": str(STATE / "kuberay.kubeconfig")}


def _node_component(name: str) -> Command:
    return realnode.argv(name, STATE, artifact_dirs())


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


def _raise_open_files(pid: int) -> None:
    """containerd, its shims and containers want many descriptors (the hard limit here is 20000,
    not 65536); raised right after the start, before any shim is forked."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (wanted, hard))


CONTROL_PLANE = [
    Component(
        "etcd",
        _etcd,
        lambda: https_ok(f"https://127.0.0.1:{ETCD_PORT}/health", "etcd-client"),
        {"etcd": ETCD_PORT, "etcd-peer": ETCD_PEER_PORT},
    ),
    Component(
        "kube-apiserver",
        _kube_apiserver,
        lambda: https_ok(f"https://127.0.0.1:{APISERVER_PORT}/readyz", "admin"),
        {"kube-apiserver": APISERVER_PORT},
    ),
    Component(
        "kube-controller-manager",
        _kube_controller_manager,
        lambda: https_ok(f"https://127.0.0.1:{KCM_PORT}/healthz", verify=False),
        {"kube-controller-manager": KCM_PORT},
    ),
    Component(
        "kube-scheduler",
        _kube_scheduler,
        lambda: https_ok(f"https://127.0.0.1:{SCHEDULER_PORT}/healthz", verify=False),
        {"kube-scheduler": SCHEDULER_PORT},
    ),
]
NODE = [
    Component(
        "containerd", partial(_node_component, "containerd"), _containerd_ok,
        spawned=_raise_open_files,
    ),
    Component(
        "kubelet", partial(_node_component, "kubelet"),
        lambda: http_ok(f"http://127.0.0.1:{realnode.KUBELET_HEALTHZ_PORT}/healthz"),
    ),
    Component(
        "kube-proxy", partial(_node_component, "kube-proxy"),
        lambda: http_ok(f"http://127.0.0.1:{realnode.KUBE_PROXY_HEALTHZ_PORT}/livez"),
    ),
    Component(
        "coredns", partial(_node_component, "coredns"),
        lambda: http_ok(f"http://127.0.0.1:{realnode.COREDNS_HEALTH_PORT}/health"),
    ),
]  # fmt: skip
SIMULATION = [
    Component(
        "kwok",
        _kwok,
        lambda: https_ok(f"https://127.0.0.1:{KWOK_PORT}/healthz", verify=False),
        {"kwok": KWOK_PORT},
    ),
    Component(
        "kuberay",
        _kuberay,
        lambda: http_ok(f"http://127.0.0.1:{KUBERAY_PROBE_PORT}/readyz"),
        {"kuberay": KUBERAY_PROBE_PORT, "kuberay-metrics": KUBERAY_METRICS_PORT},
        binary="ray-operator",
    ),
]
# This profile's components in start order; stopped in reverse (the real node's pods are
# removed first, see lifecycle.stop_all).
COMPONENTS = [*CONTROL_PLANE, *(NODE if REAL_NODE else []), *SIMULATION]
# What `down` looks for: a real node's processes whatever the profile.
ALL_COMPONENTS = [*COMPONENTS, *(c for c in NODE if c not in COMPONENTS)]


def component(name: str) -> Component:
    """A component of any profile, by name."""
    return next(c for c in ALL_COMPONENTS if c.name == name)
