"""Per-tenant API keys, read from a mounted Secret, checked before any request reaches a model.

The operator mounts the Secret `<deployment>-api-keys` of the tenant's namespace at
`ServingArgs.api_keys_path`: one file per key, the file name naming the key (the client or
application it was issued to, a label of the usage metrics) and the content being the key.
Kubernetes updates a mounted Secret in place, so keys are re-read (at most every
`RELOAD_INTERVAL_S`) and a rotated or revoked key takes effect without a restart.

Fails closed: a missing or empty folder accepts no key. Only digests are kept in memory, keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RELOAD_INTERVAL_S = 5.0

# Paths answered without a key: probes of the kubelet and load balancers.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_path(scope: Scope) -> str:
    """The request's path within the application: Ray Serve mounts an application at its route
    prefix (scope["root_path"]), which the path still starts with (ASGI, as Starlette reads it)."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """The keys of one mounted Secret folder: name → SHA-256 of the key."""

    def __init__(self, folder: str | Path, *, reload_interval_s: float = RELOAD_INTERVAL_S):
        self.folder = Path(folder)
        self.reload_interval_s = reload_interval_s
        self._digests: dict[str, bytes] = {}
        self._loaded_at = float("-inf")

    def _load(self) -> dict[str, bytes]:
        digests: dict[str, bytes] = {}
        try:
            entries = sorted(self.folder.iterdir())
        except OSError as error:
            log.warning(
                "no API keys readable at %s (%s): every request is refused",
                self.folder,
                error.strerror,
            )
            return digests
        for entry in entries:
            # A mounted Secret also holds `..data` and timestamped folders: skip hidden entries.
            if entry.name.startswith(".") or not entry.is_file():
                continue
            key = entry.read_text(errors="replace").strip()
            if key:
                digests[entry.name] = _digest(key)
        if not digests:
            log.warning("no API keys in %s: every request is refused", self.folder)
        return digests

    def digests(self) -> dict[str, bytes]:
        now = time.monotonic()
        # No lock: two concurrent reloads read the same files (the store is pickled into the
        # Serve replica, which a lock could not be).
        if now - self._loaded_at >= self.reload_interval_s:
            self._digests = self._load()
            self._loaded_at = now
        return self._digests

    def identify(self, key: str) -> str | None:
        """The name of the key, or None when it is not one of ours."""
        digest = _digest(key)
        found = None
        # Compare against every key (no early exit): timing says nothing about which matched.
        for name, candidate in self.digests().items():
            if hmac.compare_digest(digest, candidate):
                found = name
        return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def error_body(message: str, *, type_: str, code: str | None) -> bytes:
    """An error in the OpenAI API's shape, which OpenAI client libraries parse and raise."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()


def json_messages(
    status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> list[Message]:
    """The ASGI messages of a whole JSON response."""
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


MISSING_KEY = (
    "You didn't provide an API key. Pass it in the Authorization header "
    "(Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."

OnRefusal = Callable[[Scope], None]


class ApiKeyMiddleware:
    """ASGI middleware: 401 with an OpenAI-style body unless the request has a known key.

    The key's name is stored in the request's state (`scope["state"]["api_key"]`) for the usage
    metrics; `on_refusal` is called for each refused request (the error counter).
    """

    def __init__(
        self, app: ASGIApp, *, keys: KeyStore, on_refusal: OnRefusal | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.on_refusal = on_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        name = self.keys.identify(token) if token else None
        if name is None:
            if self.on_refusal is not None:
                self.on_refusal(scope)
            await self._refuse(send, MISSING_KEY if token is None else WRONG_KEY)
            return
        scope.setdefault("state", {})["api_key"] = name
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send: Send, message: str) -> None:
        body = error_body(message, type_="invalid_request_error", code="invalid_api_key")
        for part in json_messages(401, body, [(b"www-authenticate", b'Bearer realm="tramontane"')]):
            await send(part)
