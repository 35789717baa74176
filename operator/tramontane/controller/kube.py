"""The few Kubernetes API calls the operator makes, with retries on transient failures.

Raw REST paths through the official client's ApiClient: server-side apply needs the
`application/apply-patch+yaml` content type, and discovery (DynamicClient) would cost seconds and
megabytes at start-up for the handful of kinds we touch.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes.client.exceptions import ApiException

from kubernetes import client, config

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIABLE = frozenset({409, 429, 500, 502, 503, 504})
# A compare-and-swap's 409 is its answer, not a failure to retry with the same resourceVersion.
RETRIABLE_BUT_CONFLICTS = RETRIABLE - {409}
# (connect, read) seconds: a hung connection must not hold a worker thread (or an admission
# review, which the API server gives up on after its own 10 s) forever. Watches are kopf's and
# have their own timeouts; no call here is a watch.
REQUEST_TIMEOUT = (5.0, 30.0)
MAX_BACKOFF_S = 8.0
# An API server restarting refuses connections for a few seconds; etcd's leader election can
# answer 5xx for as long. Attempts * backoff must outlast that (about 30 s in all).
ATTEMPTS = 8


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        base = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


RAYSERVICE = Kind("ray.io", "v1", "rayservices")
RAYCLUSTER = Kind("ray.io", "v1", "rayclusters")
PODMONITOR = Kind("monitoring.coreos.com", "v1", "podmonitors")
MODELDEPLOYMENT = Kind("tramontane.dev", "v1alpha1", "modeldeployments")
EVENT = Kind("events.k8s.io", "v1", "events")
PERSISTENTVOLUMECLAIM = Kind("", "v1", "persistentvolumeclaims")

TENANT = Kind("tramontane.dev", "v1alpha1", "tenants", namespaced=False)
RESIDENCYPOLICY = Kind("tramontane.dev", "v1alpha1", "residencypolicies", namespaced=False)
NAMESPACE = Kind("", "v1", "namespaces", namespaced=False)
BINDING = Kind(
    "admissionregistration.k8s.io", "v1", "validatingadmissionpolicybindings", namespaced=False
)
POD = Kind("", "v1", "pods")
CLUSTERKOPFPEERING = Kind("kopf.dev", "v1", "clusterkopfpeerings", namespaced=False)
NODES = Kind("", "v1", "nodes", namespaced=False)

KINDS = {
    ("v1", "Namespace"): NAMESPACE,
    ("v1", "ResourceQuota"): Kind("", "v1", "resourcequotas"),
    ("v1", "LimitRange"): Kind("", "v1", "limitranges"),
    ("networking.k8s.io/v1", "NetworkPolicy"): Kind("networking.k8s.io", "v1", "networkpolicies"),
    ("rbac.authorization.k8s.io/v1", "Role"): Kind("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Kind(
        "rbac.authorization.k8s.io", "v1", "rolebindings"
    ),
    ("tramontane.dev/v1alpha1", "Tenant"): TENANT,
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"): BINDING,
    ("ray.io/v1", "RayService"): RAYSERVICE,
    ("ray.io/v1", "RayCluster"): RAYCLUSTER,
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR,
    ("tramontane.dev/v1alpha1", "ModelDeployment"): MODELDEPLOYMENT,
}


def _backoff(attempt: int, error: BaseException) -> float:
    """Jittered exponential backoff; a 429's Retry-After (seconds) is honoured as a minimum."""
    delay: float = min(MAX_BACKOFF_S, 0.2 * 2**attempt) * (0.5 + random.random())  # noqa: S311
    if isinstance(error, ApiException) and error.status == 429:
        retry_after = (error.headers or {}).get("Retry-After", "")
        if str(retry_after).isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
    return delay


def with_retries(
    call: Callable[[], T], attempts: int = ATTEMPTS, retriable: frozenset[int] = RETRIABLE
) -> T:
    """Retry conflicts, throttling, server errors and broken connections (refused, reset,
    timed out) with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except ApiException as error:
            if error.status not in retriable or attempt == attempts - 1:
                raise
            delay = _backoff(attempt, error)
            log.info("API %s, retrying in %.1fs", error.status, delay)
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            if attempt == attempts - 1:
                raise
            delay = _backoff(attempt, error)
            log.info("API unreachable (%s), retrying in %.1fs", type(error).__name__, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster service account, else `kubeconfig` / $KUBECONFIG / ~/.kube/config."""
        configuration = client.Configuration()
        in_cluster = False
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=configuration)
                in_cluster = True
            except config.ConfigException:
                pass  # not in a pod: a kubeconfig file
        if not in_cluster:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        # Reconciles and admission run in thread pools: let each thread keep a connection.
        configuration.connection_pool_maxsize = 32
        # urllib3's own retries would multiply ours (and hide how long a call took).
        configuration.retries = False
        return cls(client.ApiClient(configuration))

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        *,
        retriable: frozenset[int] = RETRIABLE,
    ) -> dict[str, Any]:
        def once() -> dict[str, Any]:
            request = self.api.param_serialize(
                method,
                path,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT)
            data = response.read()
            if not 200 <= response.status <= 299:
                error = ApiException(status=response.status, reason=response.reason, body=data)
                error.headers = response.getheaders()
                raise error
            return dict(json.loads(data)) if data else {}

        return with_retries(once, retriable=retriable)

    def apply(self, manifest: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply, forcing our field manager's ownership of the fields we set."""
        kind = KINDS[(manifest["apiVersion"], manifest["kind"])]
        meta = manifest["metadata"]
        return self._call(
            "PATCH",
            kind.path(meta.get("namespace"), meta["name"]),
            body=manifest,
            query=[("fieldManager", field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def create(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """POST; 409 (it exists) is raised at once."""
        return self._call(
            "POST", kind.path(namespace), body=body, retriable=RETRIABLE_BUT_CONFLICTS
        )

    def replace(
        self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """PUT; with metadata.resourceVersion set, 409 if the object changed since (at once)."""
        return self._call(
            "PUT", kind.path(namespace, name), body=body, retriable=RETRIABLE_BUT_CONFLICTS
        )

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete(self, kind: Kind, namespace: str | None, name: str) -> None:
        try:
            self._call("DELETE", kind.path(namespace, name))
        except ApiException as error:
            if error.status != 404:
                raise

    def list_all(self, kind: Kind, namespace: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._call("GET", kind.path(namespace)).get("items", [])
        return items

    def json_patch(
        self, kind: Kind, namespace: str | None, name: str, operations: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """RFC 6902 patch: `test` operations make it apply only to the object we looked at."""
        return self._call(
            "PATCH",
            kind.path(namespace, name),
            body=operations,
            content_type="application/json-patch+json",
        )

    def merge_patch(
        self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any],
        subresource: str = "",
    ) -> dict[str, Any]:  # fmt: skip
        """RFC 7386 patch (a null removes a key)."""
        return self._call(
            "PATCH",
            kind.path(namespace, name) + (f"/{subresource}" if subresource else ""),
            body=body,
            content_type="application/merge-patch+json",
        )

    def patch_status(
        self, kind: Kind, namespace: str | None, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        return self.merge_patch(kind, namespace, name, {"status": status}, "status")

    def event(
        self,
        regarding: dict[str, Any],
        *,
        type_: str,
        reason: str,
        note: str,
        action: str,
        controller: str,
    ) -> None:
        """An events.k8s.io/v1 Event about an object (best effort: never fails a reconcile)."""
        meta = regarding["metadata"]
        # Events about cluster-scoped objects (Tenants) live in `default`, as kubectl expects.
        namespace = meta.get("namespace") or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            # Named like client-go's recorder does: <object>.<unique suffix>.
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "eventTime": now,
            "reportingController": controller,
            "reportingInstance": controller,
            "action": action,
            "reason": reason,
            "note": note[:1024],
            "type": type_,
            "regarding": {
                "apiVersion": regarding["apiVersion"],
                "kind": regarding["kind"],
                "name": meta["name"],
                "namespace": meta.get("namespace", ""),
                "uid": meta.get("uid"),
            },
        }
        try:
            self._call("POST", EVENT.path(namespace), body=body)
        except ApiException as error:
            log.warning(
                "could not post event %s on %s: %s %s",
                reason,
                meta["name"],
                error.reason,
                error.body,
            )
