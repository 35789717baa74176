"""A cache of what the operator knows of its children between reconciles, from its own watches:
the children themselves (child_cache), their failing pods (pod_problems) and which of their
events matter (child_filter).

RayClusters are kept trimmed (metadata, status, worker bounds), except for one whose spec at
its current generation was not compared with the render yet: its whole spec stays until the
drift check has seen it (a thousand full specs would cost megabytes; a GET per new cluster, a
round trip on the API server).

Server-side apply of an unchanged RayService writes nothing, but the API server still validates
and defaults the whole object against KubeRay's large schema (~60 ms here, the dominant cost of a
reconcile). So each apply is recorded as (uid, generation, hash of what we applied); while the
watch shows the same child (same uid and generation, our labels and owner reference in place) and
we would apply the same manifest, the apply is skipped. Any edit of the child's spec bumps its
generation, a deletion drops it from the cache, and both come back through a real apply.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

from tramontane.render.status import HEAD_POD_READY, PodProblem

Key = tuple[str, str, str]  # kind, namespace, name


def _key(body: dict[str, Any]) -> Key:
    meta = body["metadata"]
    return (str(body["kind"]), str(meta.get("namespace", "")), str(meta["name"]))


def _trimmed(body: dict[str, Any]) -> dict[str, Any]:
    """Only what reconcile reads: a RayService's spec (serveConfigV2…) would cost megabytes at
    a thousand deployments."""
    meta = body.get("metadata", {})
    trimmed: dict[str, Any] = {
        "kind": body.get("kind"),
        "metadata": {
            key: meta[key]
            for key in (
                "name",
                "namespace",
                "uid",
                "generation",
                "resourceVersion",
                "labels",
                "ownerReferences",
            )
            if key in meta
        },
        "status": body.get("status") or {},
    }
    if body.get("kind") == "RayCluster":
        # The worker groups' bounds, which reconcile keeps in line with the RayService's.
        groups = (body.get("spec") or {}).get("workerGroupSpecs") or []
        trimmed["spec"] = {
            "workerGroupSpecs": [
                {k: g.get(k) for k in ("groupName", "minReplicas", "maxReplicas")} for g in groups
            ]
        }
    return trimmed


def _version(body: dict[str, Any]) -> tuple[str, int]:
    meta = body.get("metadata", {})
    return (str(meta.get("uid")), int(meta.get("generation", -1)))


def manifest_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class ChildCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._observed: dict[Key, dict[str, Any]] = {}
        self._applied: dict[Key, tuple[str, int, str]] = {}
        # RayClusters whose full spec was compared with the render: uid and generation then.
        self._drift_checked: dict[Key, tuple[str, int]] = {}

    def observe(self, body: dict[str, Any]) -> None:
        key = _key(body)
        trimmed = _trimmed(body)
        with self._lock:
            if key[0] == "RayCluster" and self._drift_checked.get(key) != _version(trimmed):
                # Kept whole until compared with the render (record_drift_check): the drift check
                # of a new or changed cluster then needs no GET.
                trimmed["fullSpec"] = body.get("spec") or {}
            self._observed[key] = trimmed

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._observed.pop((kind, namespace, name), None)
            self._applied.pop((kind, namespace, name), None)
            self._drift_checked.pop((kind, namespace, name), None)

    def drift_checked(self, namespace: str, name: str) -> bool:
        """Whether the RayCluster's spec, as the watch last saw it, was already compared with
        the render."""
        key = ("RayCluster", namespace, name)
        with self._lock:
            return self._drift_checked.get(key) == _version(self._observed.get(key, {}))

    def unchecked_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RayCluster with its whole spec as the watch last saw it, if it was not compared
        with the render yet (None: read it)."""
        with self._lock:
            observed = self._observed.get(("RayCluster", namespace, name))
            if observed is None or "fullSpec" not in observed:
                return None
            return {"metadata": observed["metadata"], "spec": observed["fullSpec"]}

    def record_drift_check(self, raycluster: dict[str, Any]) -> None:
        meta = raycluster["metadata"]
        key = ("RayCluster", meta["namespace"], meta["name"])
        with self._lock:
            self._drift_checked[key] = _version(raycluster)
            observed = self._observed.get(key)
            if observed is not None and _version(observed) == self._drift_checked[key]:
                observed.pop("fullSpec", None)

    def observed(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._observed.get((kind, namespace, name))

    def record_apply(self, manifest: dict[str, Any], result: dict[str, Any]) -> None:
        meta = result.get("metadata", {})
        with self._lock:
            self._applied[_key(manifest)] = (
                str(meta.get("uid")),
                int(meta.get("generation", 0)),
                manifest_hash(manifest),
            )
            self._observed.setdefault(
                _key(manifest), _trimmed({"kind": manifest["kind"], **result})
            )

    def up_to_date(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The observed child when applying `manifest` again would change nothing, else None."""
        key = _key(manifest)
        with self._lock:
            observed = self._observed.get(key)
            applied = self._applied.get(key)
        if observed is None or applied is None:
            return None
        meta = observed["metadata"]
        if applied != (
            str(meta.get("uid")),
            int(meta.get("generation", 0)),
            manifest_hash(manifest),
        ):
            return None
        wanted = manifest["metadata"]
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in wanted.get("labels", {}).items()):
            return None
        owners = meta.get("ownerReferences") or []
        if any(ref not in owners for ref in wanted.get("ownerReferences", [])):
            return None
        return observed


child_cache = ChildCache()


class PodProblems:
    """The failing serving pods of each ModelDeployment, from the watch of Ray pods (see
    render.status.pod_problem). Only failures are kept: a thousand healthy deployments cost
    nothing here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[tuple[str, str], dict[str, PodProblem]] = {}

    def observe(
        self, namespace: str, deployment: str, pod: str, problem: PodProblem | None
    ) -> bool:
        """Record a pod's state; True when that changed what its deployment reports."""
        key = (namespace, deployment)
        with self._lock:
            problems = self._problems.setdefault(key, {})
            before = problems.get(pod)
            if problem is None:
                problems.pop(pod, None)
            else:
                problems[pod] = problem
            if not problems:
                self._problems.pop(key, None)
            return before != problem

    def of(self, namespace: str, deployment: str) -> tuple[PodProblem, ...]:
        with self._lock:
            problems = self._problems.get((namespace, deployment), {})
            return tuple(problems[name] for name in sorted(problems))


pod_problems = PodProblems()


class ChildFilter:
    """Lets through only the child events that can change what the owner's reconcile does.

    KubeRay rewrites its objects' status often (timestamps, counters we don't read); reconciling
    the owner for each of those would cost the API server writes-free but real round trips, and
    queue behind the events that matter. A child's spec change (generation), its deletion and the
    status fields that feed our status always pass.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], object] = {}
        self._lock = threading.Lock()

    def changed(self, kind: str, event: Mapping[str, Any], body: dict[str, Any]) -> bool:
        meta = body.get("metadata", {})
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            if event.get("type") == "DELETED":
                self._seen.pop(key, None)
                return True
            fingerprint = (meta.get("generation"), status_fingerprint(body))
            if self._seen.get(key) == fingerprint:
                return False
            self._seen[key] = fingerprint
            return True

    def record(self, kind: str, applied: dict[str, Any]) -> None:
        """What our own apply returned: its watch event (the echo) then changes nothing."""
        meta = applied.get("metadata", {})
        with self._lock:
            self._seen[(kind, meta.get("namespace", ""), meta.get("name", ""))] = (
                meta.get("generation"),
                status_fingerprint(applied),
            )


def status_fingerprint(body: Mapping[str, Any]) -> object:
    status = body.get("status") or {}
    if body.get("kind") == "RayCluster":
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions", [])}
        return (
            status.get("state"),
            status.get("readyWorkerReplicas"),
            status.get("availableWorkerReplicas"),
            conditions.get(HEAD_POD_READY),
        )
    if body.get("kind") == "RayService":
        return tuple(
            (
                key,
                (status.get(key) or {}).get("rayClusterName"),
                repr((status.get(key) or {}).get("applicationStatuses")),
            )
            for key in ("activeServiceStatus", "pendingServiceStatus")
        )
    return None


child_filter = ChildFilter()
