"""A real Kubernetes node for the local cluster: containerd, runc, bridge CNI, kubelet, kube-proxy
and CoreDNS, all built from their Go modules by `e2e/build.sh node`, whose pods really run.

Everything lives in the network namespace of `e2e/netns.sh` (the "node" profile of the local
cluster): the control plane listens there, the bridge `cni0` carries the node's address, and no
route leads out. The recipe is the one verified in shared/REAL-PODS.md; the reasons for each
setting are next to it. This module renders configuration and plans processes; e2e/cluster/
(components.py, lifecycle.py) starts, checks and stops them like the control plane's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

NETNS = os.environ.get("TRAMONTANE_NETNS", "tramontane")
NETNS_PATH = Path("/run/netns") / NETNS
NODE_IP = os.environ.get("TRAMONTANE_NODE_IP", "10.244.0.1")
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_NAME = "tramontane-node-0"
# Where residency puts it: a region of its own, so that only ResidencyPolicies that name it
# (the end-to-end tests') send pods here, and the simulated fleet keeps the other regions.
NODE_REGION = "eu-local-1"
NODE_ZONE = "eu-local-1a"
# Pods need this toleration to land here: nothing else of the test suite's workloads (made for
# the simulated fleet, with images no registry here serves) may start real containers.
NODE_TAINT = {"key": "tramontane.dev/real-node", "value": "true", "effect": "NoSchedule"}
NODE_TOLERATION = {"key": NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
PAUSE_IMAGE = "docker.io/tramontane/pause:dev"
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
KUBE_PROXY_HEALTHZ_PORT = 10256
KUBE_PROXY_METRICS_PORT = 10249
COREDNS_HEALTH_PORT = 18053
COREDNS_READY_PORT = 18054
# The kubelet sets these at start (VM-wide, not per namespace) and has no mode that leaves them:
# they are saved before its first start and put back by `down`.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
# Debian packages whose tools the node needs at run time.
RUNTIME_TOOLS = {"nft": "nftables", "ip": "iproute2", "nsenter": "util-linux", "mount": "mount"}


class NodeError(RuntimeError):
    """The machine cannot run the real node, or one of its parts failed."""


def in_netns() -> bool:
    """Whether this process runs in the cluster's network namespace."""
    try:
        return os.stat(NETNS_PATH).st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def check_prerequisites() -> None:
    """Fail with what is missing and how to get it, before anything starts."""
    if os.geteuid() != 0:
        raise NodeError(
            "the real node needs root (network namespace, containerd, kubelet); run as root, or "
            "use the simulated fleet only: TRAMONTANE_CLUSTER_PROFILE=kwok"
        )
    missing = [
        f"{tool} (apt-get install {pkg})"
        for tool, pkg in RUNTIME_TOOLS.items()
        if not shutil.which(tool)
    ]
    if missing:
        raise NodeError(f"the real node needs: {', '.join(missing)}")
    if not Path("/sys/fs/cgroup").is_dir():
        raise NodeError("no cgroup file system at /sys/fs/cgroup: the kubelet cannot run pods")
    for module_file in ("/proc/sys/net/bridge", "/sys/module/overlay"):
        if not Path(module_file).exists():
            raise NodeError(
                f"{module_file} is missing: load the kernel module "
                f"({'br_netfilter' if 'bridge' in module_file else 'overlay'}) with modprobe"
            )
    if not in_netns():
        raise NodeError(
            f"this process is not in the cluster's network namespace {NETNS_PATH}: run it through "
            "`e2e/netns.sh exec …` (the Makefile's targets do)"
        )


# ----------------------------------------------------------------------------- configuration


def containerd_config(state: Path, dirs: dict[str, Path]) -> str:
    root = state / "node" / "containerd"
    return f"""\
version = 3
root = "{root / "root"}"
state = "{root / "state"}"

[grpc]
  address = "{containerd_socket(state)}"

[ttrpc]
  address = "{root / "containerd.sock.ttrpc"}"

[plugins]
  # The default NRI socket is machine-wide: another containerd would collide with ours.
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.internal.v1.opt']
    path = "{root / "opt"}"
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
  [plugins.'io.containerd.cri.v1.runtime']
    # Without CAP_SYS_RESOURCE (as here), runc cannot set the -997 oom_score_adj of Guaranteed
    # pods (Ray's); this caps it at containerd's own.
    restrict_oom_score_adj = true
    # Pod network namespaces under our state dir rather than /run/netns: found and cleaned with
    # the rest of the node.
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{dirs["runc"] / "runc"}"
          Root = "{root / "runc"}"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{dirs["cni-plugins"]}"]
      conf_dir = "{cni_conf_dir(state)}"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
"""


def containerd_socket(state: Path) -> Path:
    return state / "node" / "containerd" / "containerd.sock"


def cni_conf_dir(state: Path) -> Path:
    return state / "node" / "cni"


def cni_config() -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "tramontane",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # Nothing leaves the namespace, so there is nothing to masquerade for.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(state: Path, pki: Path) -> dict[str, Any]:
    node = state / "node"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # kubelet 1.35+ refuses cgroup v1 unless told (KEP-5573); these machines are cgroup v1.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",  # PID 1 is not systemd
        "containerRuntimeEndpoint": f"unix://{containerd_socket(state)}",
        "address": NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": KUBELET_HEALTHZ_PORT,
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [NODE_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": str(node / "resolv.conf"),  # never the host's: nothing outside resolves
        "podLogsDir": str(node / "pod-logs"),
        "staticPodPath": "",
        "registerWithTaints": [NODE_TAINT],
        "failSwapOn": False,
        # A test machine's disk and memory are shared with everything else: evict late.
        "evictionHard": {
            "memory.available": "200Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "2%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "serializeImagePulls": False,
        "maxPods": 64,
        # Secrets are refreshed on this period (key rotation's latency through the kubelet).
        "syncFrequency": "20s",
        "protectKernelDefaults": False,
    }


def kube_proxy_config(state: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "bindAddress": NODE_IP,
        "hostnameOverride": NODE_NAME,
        "clientConnection": {"kubeconfig": str(state / "kube-proxy.kubeconfig")},
        "clusterCIDR": CLUSTER_CIDR,
        # 0: leave the machine-wide conntrack table size alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "healthzBindAddress": f"127.0.0.1:{KUBE_PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": f"127.0.0.1:{KUBE_PROXY_METRICS_PORT}",
    }


def corefile(state: Path) -> str:
    # No `forward`: names outside the cluster have nowhere to go.
    return f"""\
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{COREDNS_HEALTH_PORT}
    ready 127.0.0.1:{COREDNS_READY_PORT}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {state / "coredns.kubeconfig"}
        pods insecure
    }}
    cache 30
}}
"""


def coredns_rbac() -> list[dict[str, Any]]:
    """What CoreDNS's kubernetes plugin reads (its upstream ClusterRole)."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "tramontane-local:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "tramontane-local:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "tramontane-local:coredns",
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "coredns"}
            ],
        },
    ]


def write_if_changed(path: Path, text: str) -> None:
    """kube-proxy exits when its configuration file is written, even with the same content, so
    a reused cluster's files (configurations, kubeconfigs) are only rewritten when they change."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_configs(state: Path, pki: Path, dirs: dict[str, Path]) -> None:
    node = state / "node"
    for sub in ("containerd", "cni", "pod-logs", "kubelet"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    files = {
        node / "containerd.toml": containerd_config(state, dirs),
        cni_conf_dir(state) / "10-tramontane.conflist": json.dumps(cni_config(), indent=2),
        node / "kubelet.yaml": yaml.safe_dump(kubelet_config(state, pki)),
        node / "kube-proxy.yaml": yaml.safe_dump(kube_proxy_config(state)),
        node / "Corefile": corefile(state),
        node / "resolv.conf": f"nameserver {NODE_IP}\n",
    }
    for path, text in files.items():
        write_if_changed(path, text)


# --------------------------------------------------------------------------------- processes


def argv(component: str, state: Path, dirs: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    node = state / "node"
    # containerd finds its shim on PATH; the kubelet and kube-proxy call mount, nft and ip.
    system_path = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    path = f"{dirs['containerd']}:{dirs['runc']}:{system_path}"
    if component == "containerd":
        return [str(dirs["containerd"] / "containerd"), f"--config={node / 'containerd.toml'}"], {
            "PATH": path
        }
    if component == "kubelet":
        labels = {
            "topology.kubernetes.io/region": NODE_REGION,
            "topology.kubernetes.io/zone": NODE_ZONE,
            "node.kubernetes.io/instance-type": "local-cpu",
        }
        return [
            str(dirs["kubelet"] / "kubelet"),
            f"--config={node / 'kubelet.yaml'}",
            f"--kubeconfig={state / 'node.kubeconfig'}",
            f"--root-dir={node / 'kubelet'}",
            f"--cert-dir={node / 'kubelet-certs'}",
            f"--node-ip={NODE_IP}",
            f"--hostname-override={NODE_NAME}",
            f"--node-labels={','.join(f'{k}={v}' for k, v in labels.items())}",
            "--v=1",
        ], {"PATH": path}
    if component == "kube-proxy":
        return [
            str(dirs["kubelet"] / "kube-proxy"),
            f"--config={node / 'kube-proxy.yaml'}",
            "--v=1",
        ], {"PATH": path}
    if component == "coredns":
        return [str(dirs["coredns"] / "coredns"), "-conf", str(node / "Corefile")], {}
    raise ValueError(component)


def save_sysctls(state: Path) -> None:
    """Record the VM-wide settings the kubelet changes, once (the first start's values)."""
    saved = state / "node" / "sysctl-saved.yaml"
    if saved.exists():
        return
    values = {key: Path("/proc/sys", key).read_text().strip() for key in KUBELET_SYSCTLS}
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(values))


def restore_sysctls(state: Path) -> None:
    saved = state / "node" / "sysctl-saved.yaml"
    if not saved.exists():
        return
    for key, value in yaml.safe_load(saved.read_text()).items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", key).write_text(f"{value}\n")
    saved.unlink()


def remove_pods(state: Path, dirs: dict[str, Path]) -> None:
    """Stop and remove every pod sandbox through CRI: their processes were reparented away from
    ours (shims), so stopping the kubelet alone would leave them running."""
    socket = containerd_socket(state)
    if not socket.exists():
        return
    crictl = [
        str(dirs["crictl"] / "crictl"),
        f"--runtime-endpoint=unix://{socket}",
        "--timeout=20s",
    ]
    listed = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True, check=False)
    pods = listed.stdout.split()
    for verb in ("stopp", "rmp"):
        if pods:
            subprocess.run([*crictl, verb, *pods], capture_output=True, check=False)


def shim_pids(state: Path) -> list[int]:
    """Shims of our containerd: they name its state dir or socket on their command line."""
    marker = str(state / "node" / "containerd")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"containerd-shim-runc-v2")
            and any(marker.encode() in part for part in cmdline)
        ):
            found.append(int(entry.name))
    return found


def pod_pids() -> list[int]:
    """Processes still in the kubelet's pod cgroups (containers whose shim is gone)."""
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup").glob("*/kubepods/**/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(line) for line in procs.read_text().split())
    return sorted(pids)


def unmount_under(root: Path) -> None:
    """Unmount everything mounted below `root`, deepest first (volumes, overlay rootfs, netns)."""
    prefix = str(root.resolve()) + "/"
    for _ in range(3):
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        time.sleep(0.2)


def remove_pod_cgroups() -> None:
    """The kubelet's cgroup tree (cgroupfs driver): `kubepods` under each controller."""
    for tree in Path("/sys/fs/cgroup").glob("*/kubepods"):
        for directory in sorted(
            (p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            tree.rmdir()
