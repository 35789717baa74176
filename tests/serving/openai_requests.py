"""OpenAI-style requests and streamed answers as the serving tests send and read them."""

from __future__ import annotations

import json
from typing import Any

import httpx


def chat(model: str, content: str = "Bonjour", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        # vLLM's extension: exactly max_tokens, whatever the model (real ones do emit EOS).
        "ignore_eos": True,
        **extra,
    }


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
