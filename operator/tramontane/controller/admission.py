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
import logging
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
from pydantic import ValidationError

from tramontane.api.tenancy import Tenant
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.controller import tenants
from tramontane.controller.indexes import Facts
from tramontane.controller.kube import (
    MODELDEPLOYMENT,
    Kube,
)
from tramontane.controller.peering import Mode
from tramontane.controller.settings import TramontaneSettings
from tramontane.policy.residency import (
    ResidencyError,
    governing_policy,
    gpus_at_max_scale,
    quota_violation,
)
from tramontane.render.tenant import TenancyError

log = logging.getLogger(__name__)
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


def webhook_server(config: TramontaneSettings) -> kopf.WebhookServer:
    """TLS webhook server from the TRAMONTANE_WEBHOOK_* settings (cert files mounted in
    production)."""
    host = config.webhook_host
    certfile, keyfile = config.webhook_cert, config.webhook_key
    if not (certfile and keyfile):
        generated = self_signed(host, Path(tempfile.mkdtemp(prefix="tramontane-webhook-")))
        certfile, keyfile = str(generated[0]), str(generated[1])
    return kopf.WebhookServer(
        addr=host if config.webhook_addr is None else config.webhook_addr,
        port=config.webhook_port,
        host=host,
        certfile=certfile,
        pkeyfile=keyfile,
        cafile=certfile if config.webhook_ca is None else config.webhook_ca,
        # A rotated certificate (cert-manager renewing the mounted Secret) is served from the
        # next check on: kopf restarts its server on the new files and, where it manages the
        # webhook configuration, puts the new CA bundle there.
        file_check_interval=CERT_CHECK_S,
    )


class InFlight:
    """What this replica admitted that its facts may not show yet: GPUs at maximum scale by
    deployment name, per namespace, each for TTL_S at most.

    One replica decides at a time (peering.Standing.mode), and it decides a namespace's reviews
    one batch after another (handlers._flush_queue): counting these entries makes its quota
    exact under any concurrency without an API call. An entry goes as soon as the facts show
    the deployment with at least its GPUs; one whose create failed after admission (another
    webhook refused it) lingers for TTL_S, which only errs towards refusing.
    """

    TTL_S = 60.0

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, dict[str, tuple[int, float]]] = {}
        self._locks: dict[str, threading.Lock] = {}

    def lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(namespace, threading.Lock())

    def admitted(
        self, namespace: str, shown: Mapping[str, int], *, from_indexes: bool
    ) -> dict[str, int]:
        """The unexpired entries not yet in `shown` (GPUs by name, as the facts count them).

        Only what the indexes show is dropped: an entry that the API already shows (a
        refusal's confirmation, a resumed replica) must still count for the next decision
        from the indexes, which may lag the API."""
        now = time.monotonic()
        with self._guard:
            entries = {
                name: (gpus, until)
                for name, (gpus, until) in self._entries.get(namespace, {}).items()
                if until > now
            }
            if from_indexes:
                entries = {
                    name: entry for name, entry in entries.items() if shown.get(name, -1) < entry[0]
                }  # fmt: skip
            self._entries[namespace] = entries
        return {name: gpus for name, (gpus, _) in entries.items() if shown.get(name, -1) < gpus}

    def record(self, namespace: str, admitted: Mapping[str, int]) -> None:
        until = time.monotonic() + self.TTL_S
        with self._guard:
            entries = self._entries.setdefault(namespace, {})
            entries.update({name: (gpus, until) for name, gpus in admitted.items()})

    def forget(self, namespace: str) -> None:
        with self._guard:
            self._entries.pop(namespace, None)
            self._locks.pop(namespace, None)


in_flight = InFlight()


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


def _placement_check(md: ModelDeployment, facts: Facts) -> Tenant:
    """Tenancy, residency policy, model sources and accelerator regions; the owning Tenant."""
    try:
        tenant = facts.owner()
    except TenancyError as error:
        raise Denied(
            f"{error}: ModelDeployments can only be created in a tenant's namespace"
        ) from None
    try:
        policy = governing_policy(md, tenant, facts.policy_of(tenant))
    except ResidencyError as refusal:
        raise Denied(f"{refusal.field}: {refusal}" if refusal.field else str(refusal)) from None
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
    mode: Mode = Mode.API  # how it was decided


def _decide(
    namespace: str,
    reviews: list[tuple[Review, ModelDeployment]],
    facts: Facts,
    *,
    from_indexes: bool,
) -> None:
    """Decide reviews of one namespace in order, as if one after the other, counting what this
    replica admitted before that `facts` do not show yet."""
    candidates: list[tuple[Review, ModelDeployment, Tenant]] = []
    for review, md in reviews:
        try:
            candidates.append((review, md, _placement_check(md, facts)))
        except Denied as refusal:
            review.outcome = refusal
    if not candidates:
        return
    known = {d.name: d.gpus for d in facts.deployments}
    with in_flight.lock(namespace):
        admitted = in_flight.admitted(namespace, known, from_indexes=from_indexes)
        for review, md, tenant in candidates:
            violation = quota_violation(tenant, known, md, admitted=admitted)
            if violation:
                review.outcome = Denied(f"spec.scaling.maxReplicas: {violation}")
                continue
            review.outcome = None
            wanted, current = gpus_at_max_scale(md), known.get(md.name)
            # Nothing to hold for a dry run, or a change that claims no more than the facts
            # already count.
            if not review.dry_run and (current is None or wanted > current):
                admitted[md.name] = wanted
                in_flight.record(namespace, {md.name: wanted})


class Confirmations:
    """When each namespace's refusals were last checked against the API: at most one check per
    namespace every INTERVAL_S, so that a tenant repeating refused creates costs the API server
    a bounded number of reads (a refusal in between stands on the indexes' word)."""

    INTERVAL_S = 1.0

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._last: dict[str, float] = {}

    def take(self, namespace: str) -> bool:
        now = time.monotonic()
        with self._guard:
            if now - self._last.get(namespace, -self.INTERVAL_S) < self.INTERVAL_S:
                return False
            self._last[namespace] = now
            return True

    def forget(self, namespace: str) -> None:
        with self._guard:
            self._last.pop(namespace, None)


confirmations = Confirmations()


class Standby(kopf.AdmissionError):
    """This replica does not decide (another one does): 503, for the client to retry."""

    def __init__(self) -> None:
        super().__init__(
            "this tramontane operator replica is a standby and does not decide admissions (the "
            "webhook Service routes to the deciding replica; this review came during a "
            "hand-over): try again",
            code=503,
        )


def _parse(namespace: str, reviews: list[Review]) -> list[tuple[Review, ModelDeployment]]:
    """The reviews' deployments; those the models refuse get their outcome (422) here."""
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
    return parsed


def admit_from_memory(
    namespace: str, reviews: list[Review], facts: Facts
) -> list[tuple[Review, ModelDeployment]]:
    """Decide reviews of one namespace that arrived together from `facts` (the indexes), with
    no I/O; returns the refusals to confirm from the API (confirm): a stale index may refuse,
    never admit."""
    parsed = _parse(namespace, reviews)
    _decide(namespace, parsed, facts, from_indexes=True)
    refused = [(review, md) for review, md in parsed if isinstance(review.outcome, Denied)]
    if not refused or not confirmations.take(namespace):
        return []
    log.info("%d review(s) in %s refused on the indexes' word, confirming from the API",
             len(refused), namespace)  # fmt: skip
    return refused


def confirm(kube: Kube, namespace: str, refused: list[tuple[Review, ModelDeployment]]) -> None:
    _decide(namespace, refused, Facts.from_api(kube, namespace), from_indexes=False)


def admit_all(kube: Kube, namespace: str, reviews: list[Review], mode: Mode) -> None:
    """Decide reviews of one namespace as a replica whose indexes may lag: from the API (API),
    or not at all (STANDBY: refused, for a retry)."""
    parsed = _parse(namespace, reviews)
    if mode is Mode.STANDBY:
        for review, _ in parsed:
            review.outcome = Standby()
    elif parsed:
        _decide(namespace, parsed, Facts.from_api(kube, namespace), from_indexes=False)


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
