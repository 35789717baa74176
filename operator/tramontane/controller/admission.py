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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tramontane.api.tenancy import ResidencyPolicy, Tenant
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.controller import indexes, tenants
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import (
    LEASE,
    MODELDEPLOYMENT,
    NAMESPACE,
    RESIDENCYPOLICY,
    TENANT,
    Kind,
    Kube,
)
from tramontane.policy.residency import disallowed_sources, gpus_at_max_scale, quota_violation
from tramontane.render.tenant import TenancyError

log = logging.getLogger(__name__)
NODES = Kind("", "v1", "nodes", namespaced=False)
CERT_CHECK_S = 10.0


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
        # A rotated certificate (cert-manager renewing the mounted Secret) is served from the
        # next check on: kopf restarts its server on the new files and, where it manages the
        # webhook configuration, puts the new CA bundle there.
        file_check_interval=CERT_CHECK_S,
    )


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

    The Lease as this process last wrote it is kept: in the steady state, admission reads
    nothing and writes once. A write from elsewhere makes ours fail (409), and only then is the
    Lease read again.
    """

    NAME = "tramontane-admission"
    ANNOTATION = "tramontane.dev/admitted"
    TTL_S = 60.0
    ATTEMPTS = 20

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._lease: dict[str, Any] | None = None
        self._known = False  # whether _lease is what the API had at our last read or write
        self._entries: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()  # this process's requests do not race each other

    def read(self) -> dict[str, int]:
        """The unexpired entries, GPUs by name."""
        if not self._known:
            self._lease = self.kube.get(LEASE, self.namespace, self.NAME)
            self._known = True
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

    def record(self, name: str, gpus: int, seen: Mapping[str, int] | None = None) -> bool:
        """Add an entry; False if someone wrote the ledger since `read` (read again)."""
        return self.record_all({name: gpus}, seen)

    def record_all(
        self, admitted: Mapping[str, int], seen: Mapping[str, int] | None = None
    ) -> bool:
        """Add entries (GPUs by name) in one write; False if someone wrote the ledger since
        `read` (read again).

        `seen`: GPUs by name of the deployments the watch already shows (fresh indexes only);
        their entries are dropped, which keeps the Lease small under a burst of creates."""
        entries = {
            other: entry for other, entry in self._entries.items()
            if seen is None or seen.get(other, -1) < int(entry.get("gpus", 0))
        }  # fmt: skip
        until = round(time.time() + self.TTL_S, 1)
        entries.update({name: {"gpus": gpus, "until": until} for name, gpus in admitted.items()})
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
                self._lease = self.kube.create(LEASE, self.namespace, body)
            else:
                self._lease = self.kube.replace(LEASE, self.namespace, self.NAME, body)
        except ApiException as error:
            # 409: written (or created) by another request meanwhile; 404: deleted since.
            self._known = False
            if error.status in (404, 409):
                return False
            raise
        return True


class Ledgers:
    """One AdmissionLedger per namespace, dropped with the namespace."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._ledgers: dict[str, AdmissionLedger] = {}

    def of(self, kube: Kube, namespace: str) -> AdmissionLedger:
        with self._guard:
            ledger = self._ledgers.get(namespace)
            if ledger is None:
                ledger = self._ledgers[namespace] = AdmissionLedger(kube, namespace)
            return ledger

    def forget(self, namespace: str) -> None:
        with self._guard:
            self._ledgers.pop(namespace, None)


ledgers = Ledgers()


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


def facts_from_api(kube: Kube, namespace: str) -> Facts:
    """What the indexes would say, read from the API: for a replica whose indexes are not
    current (a peering standby: kopf pauses its watches), and to confirm a refusal."""
    body = kube.get(NAMESPACE, None, namespace)
    meta = (body or {}).get("metadata", {})
    claimants = tuple(
        Tenant.from_body(item)
        for item in kube.list_all(TENANT)
        if (item.get("spec") or {}).get("namespace") == namespace
    )
    found: dict[str, ResidencyPolicy] = {}
    for name in {tenant.spec.residency_policy for tenant in claimants}:
        if policy := kube.get(RESIDENCYPOLICY, None, name):
            found[name] = ResidencyPolicy.from_body(policy)
    listed = kube.list_all(MODELDEPLOYMENT, namespace) if body is not None else []
    deployments = tuple(indexes.deployment_facts(item) for item in listed)
    regions = indexes.regions_by_accelerator(indexes.node_pair(n) for n in kube.list_all(NODES))
    return Facts(
        namespace=namespace,
        labels=None if body is None or meta.get("deletionTimestamp") else meta.get("labels") or {},
        claimants=claimants,
        policies=found,
        deployments=deployments,
        regions=regions,
    )


def validate_modeldeployment(
    kube: Kube,
    body: dict[str, Any],
    namespace: str,
    dry_run: bool = False,
    facts: Facts | None = None,
) -> None:
    """Admit a ModelDeployment or raise why not (admit_all for one review)."""
    review = Review(body, dry_run)
    admit_all(kube, namespace, [review], facts)
    if review.outcome is not None:
        raise review.outcome


def _placement_check(md: ModelDeployment, facts: Facts) -> Tenant:
    """Tenancy, residency policy, model sources and accelerator regions; the owning Tenant."""
    try:
        tenant = facts.owner()
    except TenancyError as error:
        raise Denied(
            f"{error}: ModelDeployments can only be created in a tenant's namespace"
        ) from None
    policy = facts.policy_of(tenant)
    if policy is None:
        raise Denied(
            f"ResidencyPolicy {tenant.spec.residency_policy} of tenant {tenant.name} does not exist"
        )
    denied = disallowed_sources(md, policy.spec)
    if denied:
        raise Denied(
            f"spec.model.uri/spec.adapters: {', '.join(denied)} not allowed by ResidencyPolicy "
            f"{policy.name} of tenant {tenant.name} (modelSources: "
            f"{', '.join(policy.spec.model_sources)})"
        )
    regions = set(facts.regions.get(md.spec.accelerator.type.value, ()))
    if policy.spec.regions != ["*"]:
        regions &= set(policy.spec.regions)
    if not regions:
        raise Denied(
            f"spec.accelerator.type: no {md.spec.accelerator.type.value} nodes in the regions "
            f"ResidencyPolicy {policy.name} allows ({', '.join(policy.spec.regions)})"
        )
    return tenant


@dataclass
class Review:
    """One admission review of a ModelDeployment; `outcome` None once admitted."""

    body: dict[str, Any]
    dry_run: bool
    outcome: BaseException | None = None


def _admit(
    kube: Kube, md: ModelDeployment, facts: Facts, dry_run: bool, *, fresh_indexes: bool
) -> None:
    review = Review({}, dry_run)
    _decide(kube, md.namespace, [(review, md)], facts, fresh_indexes=fresh_indexes)
    if review.outcome is not None:
        raise review.outcome


def _decide(
    kube: Kube,
    namespace: str,
    reviews: list[tuple[Review, ModelDeployment]],
    facts: Facts,
    *,
    fresh_indexes: bool,
) -> None:
    """Decide reviews of one namespace in order, as if one after the other, with at most one
    ledger write for all of them (a 409 decides them all again)."""
    candidates: list[tuple[Review, ModelDeployment, Tenant]] = []
    for review, md in reviews:
        try:
            candidates.append((review, md, _placement_check(md, facts)))
        except Denied as refusal:
            review.outcome = refusal
    if not candidates:
        return
    known = {d.name: d.gpus for d in facts.deployments}
    ledger = ledgers.of(kube, namespace)
    with ledger.lock:
        for _ in range(AdmissionLedger.ATTEMPTS):
            admitted = ledger.read()
            to_record: dict[str, int] = {}
            for review, md, tenant in candidates:
                others = {name: gpus for name, gpus in known.items() if name != md.name}
                violation = quota_violation(tenant, others, md, admitted={**admitted, **to_record})
                if violation:
                    review.outcome = Denied(f"spec.scaling.maxReplicas: {violation}")
                    continue
                review.outcome = None
                wanted, current = gpus_at_max_scale(md), known.get(md.name)
                # Nothing to hold for a dry run, or a change that claims no more than the watch
                # already counts.
                if not review.dry_run and (current is None or wanted > current):
                    to_record[md.name] = wanted
            seen = known if fresh_indexes else None
            if not to_record or ledger.record_all(to_record, seen):
                return
    for review, _, _ in candidates:
        review.outcome = kopf.AdmissionError(
            f"too many concurrent changes to the ModelDeployments of namespace {namespace}: "
            "try again",
            code=409,
        )


def admit_all(kube: Kube, namespace: str, reviews: list[Review], facts: Facts | None) -> None:
    """Decide reviews of one namespace that arrived together (see Review.outcome): from the
    indexes with one ledger write for all, refusals confirmed from the API; without `facts`
    (a standby), each from the API."""
    parsed: list[tuple[Review, ModelDeployment]] = []
    for review in reviews:
        body = review.body
        try:
            md = ModelDeployment.from_body(
                {**body, "metadata": {**body["metadata"], "namespace": namespace}}
            )
        except ValidationError as error:
            review.outcome = Invalid(error)
            continue
        parsed.append((review, md))
    if facts is not None:
        _decide(kube, namespace, parsed, facts, fresh_indexes=True)
        parsed = [(review, md) for review, md in parsed if isinstance(review.outcome, Denied)]
        if parsed:
            log.info("%d review(s) in %s refused on the indexes' word, confirming from the API",
                     len(parsed), namespace)  # fmt: skip
    for review, md in parsed:
        try:
            _admit(kube, md, facts_from_api(kube, namespace), review.dry_run, fresh_indexes=False)
            review.outcome = None
        except kopf.AdmissionError as error:
            review.outcome = error


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
