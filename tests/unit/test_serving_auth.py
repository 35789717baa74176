"""API keys from a mounted Secret folder (tramontane.serving.auth), without the engine."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tramontane.serving.auth import ApiKeyMiddleware, KeyStore


def test_keys_are_identified_by_their_secret_entry_name(tmp_path: Path) -> None:
    (tmp_path / "app-a").write_text("sk-aaa\n")
    (tmp_path / "app-b").write_text("sk-bbb")
    (tmp_path / "..data").mkdir()  # what a Secret volume also holds
    store = KeyStore(tmp_path)
    assert store.identify("sk-aaa") == "app-a"
    assert store.identify("sk-bbb") == "app-b"
    assert store.identify("sk-ccc") is None
    assert store.identify("") is None


def test_missing_folder_refuses_every_key(tmp_path: Path) -> None:
    assert KeyStore(tmp_path / "absent").identify("sk-aaa") is None


def test_rotated_and_revoked_keys_take_effect_without_restart(tmp_path: Path) -> None:
    (tmp_path / "app-a").write_text("sk-old")
    store = KeyStore(tmp_path, reload_interval_s=0.05)
    assert store.identify("sk-old") == "app-a"
    (tmp_path / "app-a").write_text("sk-new")
    time.sleep(0.1)
    assert store.identify("sk-old") is None
    assert store.identify("sk-new") == "app-a"
    (tmp_path / "app-a").unlink()
    time.sleep(0.1)
    assert store.identify("sk-new") is None


def call(middleware: ApiKeyMiddleware, path: str, headers: list[tuple[bytes, bytes]]) -> Any:
    sent: list[dict[str, Any]] = []
    reached: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    middleware.app = app
    scope = {"type": "http", "path": path, "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent, reached


def test_middleware_answers_401_in_openai_shape_and_passes_known_keys(tmp_path: Path) -> None:
    (tmp_path / "app-a").write_text("sk-aaa")
    middleware = ApiKeyMiddleware(None, keys=KeyStore(tmp_path))  # type: ignore[arg-type]
    sent, reached = call(middleware, "/v1/models", [])
    assert sent[0]["status"] == 401
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in body["error"]["message"]
    assert not reached
    sent, reached = call(middleware, "/v1/models", [(b"authorization", b"Bearer sk-bad")])
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["error"]["message"] == "Incorrect API key provided."
    sent, reached = call(middleware, "/v1/models", [(b"authorization", b"Bearer sk-aaa")])
    assert sent[0]["status"] == 200
    assert reached[0]["state"]["api_key"] == "app-a"
    sent, reached = call(middleware, "/healthz", [])
    assert sent[0]["status"] == 200
