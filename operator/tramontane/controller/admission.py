"""The operator's validating webhook: the admission rules that span several objects.

CRD schemas and CEL check each object alone; this checks a ModelDeployment against its Tenant
(quota at the autoscaling maximum, namespace ownership), its ResidencyPolicy (model sources,
accelerator available in an allowed region) and the cluster's nodes, and refuses to delete a
Tenant that still has deployments. kopf serves it over TLS and keeps the
ValidatingWebhookConfiguration (failurePolicy Fail: if the operator is down, our kinds are refused
and nothing else is affected).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tramontane.api.base import REGION_LABEL
from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import AcceleratorType, ModelDeployment
from tramontane.controller import tenants
from tramontane.controller.kube import (
    LEASE,
    MODELDEPLOYMENT,
    RESIDENCYPOLICY,
    Kind,
    Kube,
)
from tramontane.policy.residency import disallowed_sources, gpus_at_max_scale, quota_violation
from tramontane.render.rayservice import GPU_PRODUCT_LABEL, GPU_PRODUCTS
from tramontane.render.tenant import TenancyError

log = logging.getLogger(__name__)
NODES = Kind("", "v1", "nodes", namespaced=False)


def self_signed(host: str, directory: Path) -> tuple[Path, Path]:
    """A self-signed serving certificate for `host` (dev and tests; charts mount a real one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "tls.crt", directory / "tls.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)
    return certfile, keyfile


def webhook_server() -> kopf.WebhookServer:
    """TLS webhook server from TRAMONTANE_WEBHOOK_* (cert files mounted in production)."""
    host = os.environ.get("TRAMONTANE_WEBHOOK_HOST", "127.0.0.1")
    port = int(os.environ.get("TRAMONTANE_WEBHOOK_PORT", "9443"))
    certfile = os.environ.get("TRAMONTANE_WEBHOOK_CERT")
    keyfile = os.environ.get("TRAMONTANE_WEBHOOK_KEY")
    if not (certfile and keyfile):
        generated = self_signed(host, Path(tempfile.mkdtemp(prefix="tramontane-webhook-")))
        certfile, keyfile = str(generated[0]), str(generated[1])
    return kopf.WebhookServer(
        addr=os.environ.get("TRAMONTANE_WEBHOOK_ADDR", host),
        port=port,
        host=host,
        certfile=certfile,
        pkeyfile=keyfile,
        cafile=os.environ.get("TRAMONTANE_WEBHOOK_CA", certfile),
    )


class DeploymentIndex:
    """The ModelDeployments of each namespace as the watch last saw them.

    Admission sums a tenant's GPUs on every create; listing the namespace each time would cost
    O(n) per request (O(n²) for a tenant with many deployments). The first request for a
    namespace lists it, the watch keeps it current afterwards. What was admitted but is not in
    the watch yet is in the namespace's admission ledger (see AdmissionLedger).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_namespace: dict[str, dict[str, dict[str, Any]]] = {}
        self._namespace_locks: dict[str, threading.Lock] = {}

    def observe(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock:
            if meta["namespace"] in self._by_namespace:
                self._by_namespace[meta["namespace"]][meta["name"]] = body

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._by_namespace.get(namespace, {}).pop(name, None)

    def serialised(self, namespace: str) -> threading.Lock:
        """Held while a request for `namespace` is checked and recorded: this process's
        requests do not race each other for the ledger."""
        with self._lock:
            return self._namespace_locks.setdefault(namespace, threading.Lock())

    def deployments(self, kube: Kube, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            known = self._by_namespace.get(namespace)
            if known is not None:
                return list(known.values())
        listed = kube.list_all(MODELDEPLOYMENT, namespace)
        with self._lock:
            self._by_namespace[namespace] = {item["metadata"]["name"]: item for item in listed}
        return listed


class AdmissionLedger:
    """What the webhook admitted in a tenant's namespace that the watch may not show yet: GPUs
    at maximum scale by deployment name, each for TTL_S, in the annotation of a Lease in the
    namespace. Every operator replica serves the webhook; the ledger is how they agree.

    Admission reads it, checks the quota counting it, and writes it back with the
    resourceVersion it read (compare-and-swap): of two replicas admitting at once, one write
    fails with 409 and that request starts over with what the other admitted. Quota is thus
    exact under any concurrency, across replicas. An entry outlives the create it stands for by
    TTL_S at most (if a later admission step refused the object), which only errs towards
    refusing. Tenant admins cannot write Leases; the operator's RBAC names this one.
    """

    NAME = "tramontane-admission"
    ANNOTATION = "tramontane.dev/admitted"
    TTL_S = 60.0
    ATTEMPTS = 20

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._lease: dict[str, Any] | None = None
        self._entries: dict[str, dict[str, Any]] = {}

    def read(self) -> dict[str, int]:
        """The unexpired entries, GPUs by name."""
        self._lease = self.kube.get(LEASE, self.namespace, self.NAME)
        raw = ((self._lease or {}).get("metadata", {}).get("annotations") or {}).get(
            self.ANNOTATION, "{}"
        )
        try:
            entries = json.loads(raw)
        except ValueError:
            entries = {}
        now = time.time()
        self._entries = {
            name: entry for name, entry in entries.items()
            if isinstance(entry, dict) and float(entry.get("until", 0)) > now
        }  # fmt: skip
        return {name: int(entry.get("gpus", 0)) for name, entry in self._entries.items()}

    def record(self, name: str, gpus: int) -> bool:
        """Add an entry; False if someone wrote the ledger since `read` (read again)."""
        entries = {**self._entries, name: {"gpus": gpus, "until": time.time() + self.TTL_S}}
        meta: dict[str, Any] = {
            "name": self.NAME,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/managed-by": "tramontane"},
            "annotations": {self.ANNOTATION: json.dumps(entries, sort_keys=True)},
        }
        if self._lease is not None:
            meta["resourceVersion"] = self._lease["metadata"]["resourceVersion"]
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta}
        try:
            if self._lease is None:
                self.kube.create(LEASE, self.namespace, body)
            else:
                self.kube.replace(LEASE, self.namespace, self.NAME, body)
        except ApiException as error:
            if error.status == 409:  # written (or created) by another request meanwhile
                return False
            raise
        return True


index = DeploymentIndex()


class Denied(kopf.AdmissionError):
    """A refusal of what is understood but not allowed: 403 Forbidden, as RBAC and quota
    refusals are (kopf's default, 500, tells clients and retrying controllers that the webhook
    broke)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=403)


class Invalid(kopf.AdmissionError):
    """An object the API models refuse: 422 Unprocessable Entity, as the API server's own
    schema errors are, with each field and its rule."""

    def __init__(self, error: ValidationError) -> None:
        problems = [
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        ]
        super().__init__("; ".join(problems), code=422)


def _tenant_of(kube: Kube, namespace: str) -> Tenant:
    try:
        return tenants.owner_of(kube, namespace)
    except TenancyError as error:
        raise Denied(
            f"{error}: ModelDeployments can only be created in a tenant's namespace"
        ) from None


def _regions_with(kube: Kube, accelerator: AcceleratorType) -> set[str]:
    nodes = kube.list_all(NODES)
    if accelerator is AcceleratorType.CPU:
        return {n["metadata"].get("labels", {}).get(REGION_LABEL, "") for n in nodes}
    products = set(GPU_PRODUCTS[accelerator])
    return {
        n["metadata"].get("labels", {}).get(REGION_LABEL, "")
        for n in nodes
        if n["metadata"].get("labels", {}).get(GPU_PRODUCT_LABEL) in products
    }


def validate_modeldeployment(
    kube: Kube, body: dict[str, Any], namespace: str, dry_run: bool = False
) -> None:
    try:
        md = ModelDeployment.from_body(
            {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        )
    except ValidationError as error:
        raise Invalid(error) from None
    tenant = _tenant_of(kube, namespace)
    policy_body = kube.get(RESIDENCYPOLICY, None, tenant.spec.residency_policy)
    if policy_body is None:
        raise Denied(
            f"ResidencyPolicy {tenant.spec.residency_policy} of tenant {tenant.name} does not exist"
        )
    policy = ResidencyPolicy.from_body(policy_body)
    denied = disallowed_sources(md, policy.spec)
    if denied:
        raise Denied(
            f"spec.model.uri/spec.adapters: {', '.join(denied)} not allowed by ResidencyPolicy "
            f"{policy.name} of tenant {tenant.name} (modelSources: "
            f"{', '.join(policy.spec.model_sources)})"
        )
    regions = _regions_with(kube, md.spec.accelerator.type)
    if policy.spec.regions != ["*"]:
        regions &= set(policy.spec.regions)
    if not regions:
        raise Denied(
            f"spec.accelerator.type: no {md.spec.accelerator.type.value} nodes in the regions "
            f"ResidencyPolicy {policy.name} allows ({', '.join(policy.spec.regions)})"
        )
    with index.serialised(namespace):
        others = [
            ModelDeployment.from_body(item)
            for item in index.deployments(kube, namespace)
            if item["metadata"]["name"] != md.name
        ]
        ledger = AdmissionLedger(kube, namespace)
        for _ in range(AdmissionLedger.ATTEMPTS):
            violation = quota_violation(tenant, others, md, admitted=ledger.read())
            if violation:
                raise Denied(f"spec.scaling.maxReplicas: {violation}")
            if dry_run or ledger.record(md.name, gpus_at_max_scale(md)):
                return
        raise kopf.AdmissionError(
            f"too many concurrent changes to the ModelDeployments of namespace {namespace}: "
            "try again",
            code=409,
        )


def validate_tenant_deletion(kube: Kube, body: dict[str, Any]) -> None:
    namespace = body.get("spec", {}).get("namespace", "")
    remaining = kube.list_all(MODELDEPLOYMENT, namespace) if namespace else []
    if remaining:
        names = ", ".join(sorted(item["metadata"]["name"] for item in remaining)[:10])
        raise Denied(
            f"tenant {body['metadata']['name']} still has {len(remaining)} ModelDeployment(s) "
            f"in namespace {namespace} ({names}): delete them first; deleting the Tenant deletes "
            "its namespace"
        )


def validate_policy_deletion(kube: Kube, body: dict[str, Any]) -> None:
    """A ResidencyPolicy in use stays: deleting it would leave its tenants' namespaces without
    the rules their deployments are placed and admitted by."""
    name = body["metadata"]["name"]
    users = sorted(tenants.users_of(kube, name))
    if users:
        raise Denied(
            f"ResidencyPolicy {name} is the residencyPolicy of Tenant {', '.join(users[:10])}"
            f"{' and others' if len(users) > 10 else ''}: move those tenants to another policy "
            "first"
        )
