"""One active operator replica: kopf peering, and the same verdict for our own background work.

kopf pauses an operator's watches while a live peer with a higher priority exists (and pauses all
of them when priorities tie). Replicas of the Deployment take their priority from their start
time, older is higher, so the first replica works and later ones wait until it is gone; a rolling
update hands over when the old pod exits (kopf removes its record) or its record expires.

The periodic resync runs outside kopf's reactor, so it asks the same question itself.
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Mapping
from typing import Any

# Priorities are start times counted down from here (ms, year 2248), so that an earlier start is
# higher, with random low bits: the replicas of a Deployment start in the same millisecond more
# often than not, and kopf pauses *every* operator whose priority ties (seen: both replicas of a
# fresh install paused for good). The result stays within int64, as the API server stores it.
_PRIORITY_ORIGIN_MS = 2**43
_TIE_BREAK_BITS = 20


def priority_from_start(started: float | None = None, tie_break: int | None = None) -> int:
    """kopf priority for a replica started at `started` (epoch seconds): older is higher; within
    one millisecond, `tie_break` (random by default) decides."""
    started_ms = int((time.time() if started is None else started) * 1000)
    if tie_break is None:
        tie_break = secrets.randbits(_TIE_BREAK_BITS)
    return ((_PRIORITY_ORIGIN_MS - started_ms) << _TIE_BREAK_BITS) | tie_break


def _alive(record: Mapping[str, Any], now: datetime.datetime) -> bool:
    try:
        lastseen = datetime.datetime.fromisoformat(str(record["lastseen"]))
        lifetime = datetime.timedelta(seconds=int(record.get("lifetime", 60)))
    except (KeyError, ValueError):
        return False
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=datetime.UTC)
    return lastseen + lifetime > now


def is_active(
    peering_status: Mapping[str, Any], identity: str, priority: int, now: datetime.datetime
) -> bool:
    """True when no other live peer has our priority or a higher one (kopf's own rule)."""
    for peer, record in peering_status.items():
        if peer == identity or not isinstance(record, Mapping) or not _alive(record, now):
            continue
        if int(record.get("priority", 0)) >= priority:
            return False
    return True
