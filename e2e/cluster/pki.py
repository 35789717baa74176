"""The cluster's PKI: one CA, a certificate per component and client, and kubeconfigs."""

from __future__ import annotations

import base64
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

import realnode
from cluster.base import STATE
from cluster.components import APISERVER_PORT


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
        # KubeRay gets only its upstream ClusterRole (bound in lifecycle.install_addons).
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
                    "server": f"https://127.0.0.1:{APISERVER_PORT}",
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
