"""What the serving tests call: the sample application deployed on the session's local Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from localray import LocalRay
from tramontane.render.rayservice import SERVE_PORT

MODELS_CLAIM = "test-models"  # the "PVC" holding the test models, see model_root
SERVE_URL = f"http://127.0.0.1:{SERVE_PORT}"


@dataclass(frozen=True)
class ServedApp:
    """A deployed application and what clients need to call it."""

    url: str
    name: str
    model: str
    adapters: tuple[str, ...]
    keys: dict[str, str]  # key name → key
    ray: LocalRay
    config: dict[str, Any]

    def client(self, key: str | None = "app-a", **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def async_client(self, key: str = "app-a", **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.keys[key]}"},
            timeout=300,
            **kwargs,
        )
