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

The benchmark's client is a cheaper one (`closed_loop`, `open_loop`, `stream_chat_cheap`, on
aiohttp): it shares one core with the servers it measures, so it does not JSON-parse every
server-sent event. It looks for generated text in the raw bytes, counts events with byte
operations and parses only the last event before `[DONE]` (the usage chunk). Its results
(`TimedResult`) also carry the time of the last chunk with text, for the mean inter-token latency
of each request.

    report = asyncio.run(closed_loop("http://127.0.0.1:8000", "my-model", concurrency=16,
                                     requests=64, max_tokens=128))
    arrivals = poisson_arrivals(rate_per_s=2.5, count=120, seed=1)
    report = asyncio.run(open_loop("http://127.0.0.1:8000", "my-model", arrivals_s=arrivals,
                                   max_tokens=128))
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
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


def chat_request(
    model: str, prompt: str, max_tokens: int, *, ignore_eos: bool = True
) -> dict[str, Any]:
    """A streamed chat completion with usage in its last chunk (exactly max_tokens with
    ignore_eos, a vLLM extension)."""
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
    return body


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
    body = chat_request(model, prompt, max_tokens, ignore_eos=ignore_eos)
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


# --- The benchmark's cheap client --------------------------------------------------------------

CHAT_PATH = "/v1/chat/completions"
# A chunk with generated text: `"content":"` then anything but the closing quote (the first chunk
# of a chat stream carries the role and an empty content). vLLM writes compact JSON; json.dumps
# (used by Ray Serve LLM for some responses) puts a space after the colon.
_TEXT = re.compile(rb'"content":\s*"[^"]')
# An OpenAI error object streamed as an event ({"error": {...}} or {"object": "error", ...}).
_ERROR = re.compile(rb'"error"\s*:|"object"\s*:\s*"error"')
_DONE = b"data: [DONE]"


@dataclass
class TimedResult(StreamResult):
    """A StreamResult of the cheap client, with the timing of its last chunk with text.

    ttft_s and last_token_s are counted from sending the request; launch_lag_s is how late an
    open-loop request was sent after its scheduled time.
    """

    last_token_s: float | None = None
    events: int = 0
    launch_lag_s: float = 0.0

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency: (last text chunk - first) / (tokens - 1).

        Per chunk it would mean nothing: Ray Serve LLM batches tokens into 50 ms chunks.
        """
        if not self.ok or self.ttft_s is None or self.last_token_s is None:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.last_token_s - self.ttft_s) / (self.completion_tokens - 1)


def chat_body(model: str, prompt: str, max_tokens: int, *, ignore_eos: bool = True) -> bytes:
    """The JSON body of a streamed chat completion with usage in its last chunk."""
    return json.dumps(chat_request(model, prompt, max_tokens, ignore_eos=ignore_eos)).encode()


def _split_last(data: bytes) -> tuple[bytes, bytes]:
    """(everything before the last event, the last event) of complete events."""
    cut = data.rfind(b"\n\n")
    if cut < 0:
        return b"", data
    return data[:cut], data[cut + 2 :]


def _event_json(event: bytes) -> Any:
    """The JSON payload of one `data: ...` event."""
    event = event.strip()
    if event.startswith(b"data:"):
        event = event[len(b"data:") :]
    return json.loads(event)


def _streamed_error(events: bytes) -> str | None:
    """The message of the first error object among these events, if there is one."""
    for event in events.split(b"\n\n"):
        if _ERROR.search(event):
            try:
                message = _error_message(_event_json(event))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if message is not None:
                return message
    return None


class _Scan:
    """What the cheap client keeps of a chat stream, fed the bytes as they arrive."""

    def __init__(self) -> None:
        self.ttft: float | None = None
        self.last_token: float | None = None
        self.events = 0
        self.done = False
        self.last_data = b""  # the last data event before [DONE]
        self.pending = b""  # bytes after the last complete event

    def feed(self, chunk: bytes, now: float) -> str | None:
        """Take received bytes (at `now`); an error streamed by the server, if any."""
        self.pending += chunk
        cut = self.pending.rfind(b"\n\n")
        if cut < 0:
            return None
        complete, self.pending = self.pending[:cut], self.pending[cut + 2 :]
        self.events += complete.count(b"\n\n") + 1
        if _TEXT.search(complete):
            if self.ttft is None:
                self.ttft = now
            self.last_token = now
        if _ERROR.search(complete) and (error := _streamed_error(complete)) is not None:
            return error
        head, last = _split_last(complete)
        if last.strip() == _DONE:
            self.done = True
            self.events -= 1
            if head:
                self.last_data = _split_last(head)[1]
        else:
            self.last_data = last
        return None

    def outcome(self) -> tuple[int, str | None]:
        """(completion tokens, error) once the body has ended."""
        if not self.done and self.pending.strip() != _DONE:
            return 0, "stream ended without [DONE]"
        try:
            payload = _event_json(self.last_data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return 0, f"unreadable last event: {error}"
        if (message := _error_message(payload)) is not None:
            return 0, message
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not usage:
            return 0, "no usage chunk before [DONE]"
        tokens = int(usage.get("completion_tokens") or 0)
        if self.ttft is None:
            return tokens, "no text in the stream"
        return tokens, None


async def stream_chat_cheap(
    session: aiohttp.ClientSession, url: str, body: bytes, *, launch_lag_s: float = 0.0
) -> TimedResult:
    """POST one streamed chat completion (body from chat_body) to url and read it to its end.

    TTFT is the time from sending the request to the first received bytes with generated text;
    the completion tokens come from the usage chunk, the only event parsed.
    """
    started = time.perf_counter()
    scan = _Scan()
    status = 0

    def result(tokens: int, error: str | None) -> TimedResult:
        return TimedResult(
            error is None, status, scan.ttft, time.perf_counter() - started, tokens, error,
            last_token_s=scan.last_token, events=scan.events, launch_lag_s=launch_lag_s,
        )  # fmt: skip

    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            status = response.status
            if status != 200:
                text = await response.text(errors="replace")
                try:
                    message = _error_message(json.loads(text)) or text
                except json.JSONDecodeError:
                    message = text
                return result(0, f"{status}: {message.strip()[:500]}")
            async for chunk in response.content.iter_any():
                # After [DONE], read on to the body's end: the connection is then kept alive.
                if (
                    not scan.done
                    and (error := scan.feed(chunk, time.perf_counter() - started)) is not None
                ):
                    return result(0, error)
    except (aiohttp.ClientError, TimeoutError) as error:
        return result(0, f"{type(error).__name__}: {error}")
    return result(*scan.outcome())


def _session(headers: Mapping[str, str] | None, connections: int) -> aiohttp.ClientSession:
    """One session per run: `connections` kept-alive connections at most."""
    connector = aiohttp.TCPConnector(limit=max(1, connections), keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=30)
    return aiohttp.ClientSession(connector=connector, headers=dict(headers or {}), timeout=timeout)


async def closed_loop(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int = 128,
    prompt: str = DEFAULT_PROMPT,
    headers: Mapping[str, str] | None = None,
    ignore_eos: bool = True,
) -> LoadReport:
    """`requests` streamed requests, `concurrency` at a time (each worker sends its next one as
    soon as its last one ended); wall_s runs from the first request to the last one's end."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    report = LoadReport()
    body = chat_body(model, prompt, max_tokens, ignore_eos=ignore_eos)
    url = base_url.rstrip("/") + CHAT_PATH
    remaining = requests
    async with _session(headers, concurrency) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                report.results.append(await stream_chat_cheap(session, url, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
        report.wall_s = time.perf_counter() - started
    return report


def poisson_arrivals(rate_per_s: float, count: int, seed: int) -> list[float]:
    """Send times (s from the start) of a Poisson process: exponential gaps, the first at 0."""
    if rate_per_s <= 0:
        raise ValueError("the arrival rate must be positive")
    rng = random.Random(seed)  # noqa: S311 (a load schedule, not a secret)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate_per_s)
    return times


async def open_loop(
    base_url: str,
    model: str,
    *,
    arrivals_s: Sequence[float],
    max_tokens: int = 128,
    prompt: str = DEFAULT_PROMPT,
    headers: Mapping[str, str] | None = None,
    ignore_eos: bool = True,
) -> LoadReport:
    """One streamed request at each of the arrival times (s from the start), whether or not the
    earlier ones have ended (an open loop: the server's slowness does not slow the arrivals);
    wall_s runs from the start to the last request's end."""
    report = LoadReport()
    body = chat_body(model, prompt, max_tokens, ignore_eos=ignore_eos)
    url = base_url.rstrip("/") + CHAT_PATH
    async with _session(headers, len(arrivals_s)) as session:

        async def one(lag: float) -> None:
            report.results.append(await stream_chat_cheap(session, url, body, launch_lag_s=lag))

        tasks = []
        started = time.perf_counter()
        for offset in sorted(arrivals_s):
            delay = started + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - started - offset
            tasks.append(asyncio.create_task(one(lag)))
        await asyncio.gather(*tasks)
        report.wall_s = time.perf_counter() - started
    return report
