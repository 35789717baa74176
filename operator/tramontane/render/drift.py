"""Drift: what in a running RayCluster no longer is what the operator rendered. Pure.

KubeRay makes a RayService's RayCluster from its rayClusterConfig and then only compares hashes of
the RayService spec: an edit of the RayCluster itself (another image, a sidecar, a worker group
smuggled in, a hostPath volume) is never undone by KubeRay. The tenant guard policies refuse such
edits from anyone but KubeRay and the operator; this is the second line: the operator compares
the clusters KubeRay runs for a deployment with the rendered spec and puts its own back.

What is legitimately KubeRay's or the Ray autoscaler's is left out: each worker group's
replicas and scaleStrategy (the autoscaler scales), and its bounds (see worker_bounds_patch).
The comparison tolerates a Go round trip through KubeRay: zero values dropped (omitempty),
quantities rewritten in canonical form ("0.5" → "500m"), an empty creationTimestamp.
"""

from __future__ import annotations

from typing import Any

from tramontane.render.rayservice import quantity_value

# Per worker group, what the autoscaler and the operator's bounds patch own.
SCALING_FIELDS = frozenset({"replicas", "minReplicas", "maxReplicas", "scaleStrategy"})


def _empty(value: Any) -> bool:
    return value is None or value in ({}, [], "", 0, False)


def _same_scalar(rendered: Any, live: Any) -> bool:
    if rendered == live:
        return True
    if isinstance(rendered, str | int) and isinstance(live, str | int):
        a, b = quantity_value(str(rendered)), quantity_value(str(live))
        return a is not None and a == b
    return False


def differences(rendered: Any, live: Any, path: str = "") -> list[str]:
    """The paths where `live` is not `rendered`: a changed value, a list of another length, or a
    key the render does not have set to something non-empty (an addition is drift too)."""
    if isinstance(rendered, dict) and isinstance(live, dict):
        return [
            difference
            for key in sorted(rendered.keys() | live.keys())
            if not (key == "creationTimestamp" and live.get(key) is None)
            for difference in differences(rendered.get(key), live.get(key), f"{path}.{key}")
        ]
    if isinstance(rendered, list) and isinstance(live, list) and len(live) == len(rendered):
        return [
            difference
            for index, (want, have) in enumerate(zip(rendered, live, strict=True))
            for difference in differences(want, have, f"{path}[{index}]")
        ]
    if rendered is None or live is None:
        # Zero values vanish in KubeRay's Go round trip (omitempty), in either direction.
        return [] if _empty(rendered if live is None else live) or _all_empty(rendered) else [path]
    return [] if _same_scalar(rendered, live) else [path]


def _all_empty(value: Any) -> bool:
    return isinstance(value, dict) and all(_empty(v) for v in value.values())


def _without_scaling(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in SCALING_FIELDS}


def cluster_drift(rendered_spec: dict[str, Any], raycluster: dict[str, Any]) -> list[str]:
    """Where a RayCluster's spec drifted from the rendered rayClusterConfig (scaling aside).
    Worker groups are matched by name: one added or removed is drift by its name."""
    live = dict(raycluster.get("spec") or {})
    want = dict(rendered_spec)
    live_groups = {g.get("groupName"): g for g in live.pop("workerGroupSpecs", None) or []}
    want_groups = {g.get("groupName"): g for g in want.pop("workerGroupSpecs", None) or []}
    found = differences(want, live, ".spec")
    for index, (name, group) in enumerate(want_groups.items()):
        if name not in live_groups:
            found.append(f".spec.workerGroupSpecs[{name}] missing")
            continue
        found += differences(
            _without_scaling(group), _without_scaling(live_groups[name]),
            f".spec.workerGroupSpecs[{index}]",
        )  # fmt: skip
    found += [f".spec.workerGroupSpecs[{name}] added" for name in live_groups.keys() - want_groups]
    return found


def drift_revert_patch(
    rendered_spec: dict[str, Any], raycluster: dict[str, Any]
) -> list[dict[str, Any]]:
    """JSON-patch operations that put the rendered spec back, or [] when nothing drifted.

    Guarded by a `test` of the resourceVersion: an edit in between makes the patch fail and the
    next event brings a fresh look. Each worker group keeps the replicas and scaleStrategy the
    autoscaler gave it; a group the render does not have goes."""
    if not cluster_drift(rendered_spec, raycluster):
        return []
    live = raycluster.get("spec") or {}
    live_groups = {g.get("groupName"): g for g in live.get("workerGroupSpecs") or []}
    groups = []
    for group in rendered_spec.get("workerGroupSpecs") or []:
        kept = {
            key: live_groups[group["groupName"]][key]
            for key in ("replicas", "scaleStrategy")
            if group["groupName"] in live_groups and key in live_groups[group["groupName"]]
        }
        groups.append({**group, **kept})
    spec = {**rendered_spec, "workerGroupSpecs": groups}
    return [
        {"op": "test", "path": "/metadata/resourceVersion",
         "value": raycluster["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/spec", "value": spec},
    ]  # fmt: skip
