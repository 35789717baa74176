"""One active operator replica: kopf's peering, and the webhook's view of it.

kopf pauses an operator's watches, handlers and timers while a live peer with a higher priority
exists (and pauses all of them when priorities tie). Replicas of the Deployment take their
priority from their start time, older is higher, so the first replica works and later ones wait
until it is gone; a rolling update hands over when the old pod exits (kopf removes its record)
or its record expires (`lifetime`, 60 s, after the last `lastseen`).

Only the admission webhook runs outside that pause: the webhook Service reaches every replica.
A paused replica's indexes stopped with its watches, so its webhook must not trust them; it asks
`Standing.active()`, which applies kopf's rule to the peering record (read at most every
CACHE_S seconds, so admission stays free of API calls in the steady state).
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tramontane.controller.kube import CLUSTERKOPFPEERING, Kube

# Priorities are start times counted down from here (ms, year 2248), so that an earlier start is
# higher, with random low bits: the replicas of a Deployment start in the same millisecond more
# often than not, and kopf pauses *every* operator whose priority ties (seen: both replicas of a
# fresh install paused for good). The result stays within int64, as the API server stores it.
_PRIORITY_ORIGIN_MS = 2**43
_TIE_BREAK_BITS = 20
# How stale the webhook's view of the peering may be. A replica paused less than this long ago
# still trusts indexes that stopped at its pause; what others admitted since is in the admission
# ledger (60 s), so the verdict stays exact.
CACHE_S = 5.0
# After a pause, kopf lists every kind again before its watches resume; until that is surely
# over, the indexes may still miss what was created meanwhile.
SETTLE_S = 30.0


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


class Standing:
    """This replica's place among its peers (no peering name: standalone, always active)."""

    def __init__(self, name: str | None, client: Callable[[], Kube]) -> None:
        self.name = name
        self._client = client
        # kopf identifies a peer by POD_ID (the chart sets the pod name); we need the same id.
        self.identity = os.environ.setdefault("POD_ID", f"{socket.gethostname()}-{os.getpid()}")
        self.priority = priority_from_start()
        self._lock = threading.Lock()
        self._verdict: tuple[float, bool] | None = None
        self._resumed_at: float | None = None  # when we last went from paused to active

    def trusts_indexes(self) -> bool:
        """Whether this replica's indexes are current: it is the active one, and has been for
        SETTLE_S if it was ever seen paused."""
        if self.name is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self._verdict is None or now - self._verdict[0] >= CACHE_S:
                body = self._client().get(CLUSTERKOPFPEERING, None, self.name) or {}
                active = is_active(
                    body.get("status") or {},
                    self.identity,
                    self.priority,
                    datetime.datetime.now(datetime.UTC),
                )
                if active and self._verdict is not None and not self._verdict[1]:
                    self._resumed_at = now
                self._verdict = (now, active)
            settled = self._resumed_at is None or now - self._resumed_at >= SETTLE_S
            return self._verdict[1] and settled
