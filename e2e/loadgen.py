"""A load generator for OpenAI-compatible endpoints: concurrent streamed chat completions.

Used by the serving tests (autoscaling, concurrency) and by `make bench-serving`. Each of
`concurrency` workers issues streamed `/v1/chat/completions` requests one after the other, until
it has sent `requests_per_worker` of them or `duration_s` has passed. Requests ask for
`ignore_eos` (a vLLM extension), so each one generates exactly `max_tokens` tokens and runs are
comparable whatever the model says.

    from loadgen import run_load
    report = asyncio.run(run_load("http://127.0.0.1:8000", "my-model", concurrency=64,
                                  requests_per_worker=1, max_tokens=128,
                                  headers={"Authorization": "Bearer sk-..."}))
    report.output_tokens_per_s, report.ttft_p50_s, report.failures

`base_url` is the server's root (or an application's route prefix), without `/v1`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx  # type: ignore[import-not-found,unused-ignore]

DEFAULT_PROMPT = (
    "Write a detailed report on the wind patterns of the western Mediterranean, "
    "with a section on the tramontane and the mistral."
)
TIMEOUT_S = 600.0


@dataclass
class StreamResult:
    """One streamed request: its outcome, time to first token and generated tokens."""

    ok: bool
    status: int
    ttft_s: float | None
    total_s: float
    completion_tokens: int
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of values, interpolated between closest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LoadReport:
    """Every request of a run and the run's figures."""

    results: list[StreamResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok_results(self) -> list[StreamResult]:
        return [r for r in self.results if r.ok]

    @property
    def failures(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ttfts_s(self) -> list[float]:
        return [r.ttft_s for r in self.results if r.ok and r.ttft_s is not None]

    @property
    def ttft_p50_s(self) -> float:
        return percentile(self.ttfts_s, 0.50)

    @property
    def ttft_p99_s(self) -> float:
        return percentile(self.ttfts_s, 0.99)

    def errors(self, limit: int = 3) -> list[str]:
        """The first distinct error messages."""
        seen: list[str] = []
        for result in self.results:
            if result.error and result.error not in seen:
                seen.append(result.error)
                if len(seen) == limit:
                    break
        return seen

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.results),
            "failures": self.failures,
            "wall_s": round(self.wall_s, 3),
            "completion_tokens": self.completion_tokens,
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "ttft_p50_ms": round(self.ttft_p50_s * 1000, 1),
            "ttft_p99_ms": round(self.ttft_p99_s * 1000, 1),
        }


def _error_message(payload: Any) -> str | None:
    """The message of an OpenAI error object (`{"error": {...}}` or a bare one), if it is one."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if error is None and payload.get("object") == "error":
        error = payload
    if error is None:
        return None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _delta_text(chunk: dict[str, Any]) -> bool:
    """Whether a chat completion chunk carries generated text."""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


async def stream_chat(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    path: str = "/v1/chat/completions",
) -> StreamResult:
    """POST one streamed chat completion and read it to its end.

    TTFT is the time from sending the request to the first chunk with text; the completion
    tokens come from the final usage chunk (`stream_options.include_usage`).
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    started = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    status = 0
    done = False
    try:
        async with client.stream("POST", path, json=body) as response:
            status = response.status_code
            if status != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    message = _error_message(json.loads(text)) or text
                except json.JSONDecodeError:
                    message = text
                return StreamResult(
                    False, status, None, time.perf_counter() - started, 0, f"{status}: {message}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                error = _error_message(chunk)
                if error is not None:
                    return StreamResult(
                        False, status, ttft, time.perf_counter() - started, tokens, error
                    )
                if ttft is None and _delta_text(chunk):
                    ttft = time.perf_counter() - started
                usage = chunk.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        message = f"{type(error).__name__}: {error}"
        return StreamResult(False, status, ttft, time.perf_counter() - started, tokens, message)
    total = time.perf_counter() - started
    if not done:
        return StreamResult(False, status, ttft, total, tokens, "stream ended without [DONE]")
    if ttft is None:
        return StreamResult(False, status, ttft, total, tokens, "no text in the stream")
    return StreamResult(True, status, ttft, total, tokens, None)


async def run_load(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests_per_worker: int | None = None,
    duration_s: float | None = None,
    max_tokens: int = 128,
    prompt: str = DEFAULT_PROMPT,
    headers: Mapping[str, str] | None = None,
    ignore_eos: bool = True,
) -> LoadReport:
    """`concurrency` workers streaming requests until each sent its count or time is up.

    With both limits, a worker stops at whichever comes first; a request started before the
    deadline is finished (and counted) after it.
    """
    if requests_per_worker is None and duration_s is None:
        raise ValueError("give requests_per_worker or duration_s")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    report = LoadReport()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(TIMEOUT_S, connect=30.0)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=dict(headers or {}), limits=limits, timeout=timeout
    ) as client:
        started = time.perf_counter()
        deadline = None if duration_s is None else started + duration_s

        async def worker() -> None:
            sent = 0
            while requests_per_worker is None or sent < requests_per_worker:
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                result = await stream_chat(client, model, prompt, max_tokens, ignore_eos=ignore_eos)
                report.results.append(result)
                sent += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.wall_s = time.perf_counter() - started
    return report
