"""One active operator replica: kopf's peering, and the webhook's view of it.

kopf pauses an operator's watches, handlers and timers while a live peer with a higher priority
exists (and pauses all of them when priorities tie). Replicas of the Deployment take their
priority from their start time, older is higher, so the first replica works and later ones wait
until it is gone; a rolling update hands over when the old pod exits (kopf removes its record)
or its record expires (LIFETIME_S after its last `lastseen`).

Only the admission webhook runs outside that pause. Quota is exact because one replica decides
at a time, counting what it admitted that its facts do not show yet (admission.InFlight); so
`Standing.mode()` applies kopf's rule to the peering record (read at most every CACHE_S
seconds: admission makes no API call in the steady state) and says how this replica decides:
- MEMORY: the settled active replica, from its indexes;
- API: the active replica from the API, while its indexes may lag (just resumed: kopf lists
  everything again) or while its own record is about to expire (it may be superseded soon);
- STANDBY: not at all (refused, "retry"): another replica decides. The webhook Service routes
  to the replica labelled as deciding (see handlers.keep_admission_label), so a standby sees
  reviews only while a hand-over propagates.
A replica stops deciding from memory 1 s before the others may see its record expire (its own
view of the record is at most CACHE_S old), and a resumed one decides from the API for SETTLE_S:
two replicas never decide from memory at once.
"""

from __future__ import annotations

import datetime
import enum
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from tramontane.controller.kube import CLUSTERKOPFPEERING, Kube

# Priorities are start times counted down from here (ms, year 2248), so that an earlier start is
# higher, with random low bits: the replicas of a Deployment start in the same millisecond more
# often than not, and kopf pauses *every* operator whose priority ties (seen: both replicas of a
# fresh install paused for good). The result stays within int64, as the API server stores it.
_PRIORITY_ORIGIN_MS = 2**43
_TIE_BREAK_BITS = 20
# kopf's peering lifetime (its default is 60 s): how long a killed active replica blocks the
# take-over; kopf refreshes a record every LIFETIME_S - 5..10 s.
LIFETIME_S = 30
# How stale the webhook's view of the peering may be.
CACHE_S = 2.0
# What a replica leaves between its last decision from memory and the earliest moment another
# replica may see its record expire (covers a slow keepalive write and clock skew).
MARGIN_S = 1.0
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


class Mode(enum.Enum):
    MEMORY = "memory"
    API = "api"
    STANDBY = "standby"


def _age(record: Mapping[str, Any] | None, now: datetime.datetime) -> float | None:
    """Seconds since the record's lastseen; None without a readable one."""
    try:
        lastseen = datetime.datetime.fromisoformat(str((record or {})["lastseen"]))
    except (KeyError, ValueError):
        return None
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=datetime.UTC)
    return (now - lastseen).total_seconds()


def _alive(record: Mapping[str, Any], now: datetime.datetime) -> bool:
    age = _age(record, now)
    try:
        return age is not None and age < int(record.get("lifetime", 60))
    except (TypeError, ValueError):
        return False


def mode_of(
    peering_status: Mapping[str, Any], identity: str, priority: int, now: datetime.datetime
) -> Mode:
    """How a replica decides admissions, from the peering record (before SETTLE_S)."""
    if not is_active(peering_status, identity, priority, now):
        return Mode.STANDBY
    own = peering_status.get(identity)
    age = _age(own if isinstance(own, Mapping) else None, now)
    if age is None:
        return Mode.STANDBY  # kopf has not announced us yet: others may not know of us
    lifetime = float((own or {}).get("lifetime", LIFETIME_S))
    if age >= lifetime - MARGIN_S:
        return Mode.STANDBY  # others may see us expired and take over
    if age >= lifetime - CACHE_S - MARGIN_S:
        return Mode.API  # a late keepalive: decide as a replica that may be superseded
    return Mode.MEMORY


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


class Reading(NamedTuple):
    """The mode the peering record gave, and when it was read (time.monotonic())."""

    at: float
    mode: Mode


class Standing:
    """This replica's place among its peers (no peering name: standalone, always active)."""

    def __init__(self, name: str | None, client: Callable[[], Kube]) -> None:
        self.name = name
        self._client = client
        # kopf identifies a peer by POD_ID (the chart sets the pod name); we need the same id,
        # which main.run() hands to kopf (not here: importing the handlers must not set it).
        self.identity = os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"
        self.priority = priority_from_start()
        self._lock = threading.Lock()
        self._reading: Reading | None = None
        self._resumed_at: float | None = None  # when we last went from standby to deciding
        # Whether kopf's record of this replica was seen: until then the standing is unknown.
        self.announced = name is None

    def cached_mode(self) -> Mode | None:
        """The mode if known without an API call (None: call mode() off the event loop)."""
        if self.name is None:
            return Mode.MEMORY
        with self._lock:
            if self._reading is None or time.monotonic() - self._reading.at >= CACHE_S:
                return None
            return self._settled(self._reading.mode, time.monotonic())

    def mode(self) -> Mode:
        """How this replica decides admissions now (reads the peering record every CACHE_S)."""
        if self.name is None:
            return Mode.MEMORY
        with self._lock:
            now = time.monotonic()
            if self._reading is None or now - self._reading.at >= CACHE_S:
                body = self._client().get(CLUSTERKOPFPEERING, None, self.name) or {}
                status = body.get("status") or {}
                self.announced = self.announced or self.identity in status
                mode = mode_of(
                    status,
                    self.identity,
                    self.priority,
                    datetime.datetime.now(datetime.UTC),
                )
                was = self._reading.mode if self._reading else None
                if mode is not Mode.STANDBY and was is Mode.STANDBY:
                    self._resumed_at = now
                self._reading = Reading(now, mode)
            return self._settled(self._reading.mode, now)

    def _settled(self, mode: Mode, now: float) -> Mode:
        resumed = self._resumed_at
        if mode is Mode.MEMORY and resumed is not None and now - resumed < SETTLE_S:
            return Mode.API
        return mode
