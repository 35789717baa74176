"""The OpenAI-compatible API of the sample deployment, served by the real engine (vLLM CPU)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testmodel import greedy_continuation
from tests.kube import eventually
from tests.serving.openai_requests import chat, sse_events
from tests.serving.served_app import ServedApp

pytestmark = pytest.mark.serving


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "type" in error
    return dict(error)


def test_models_lists_the_base_model_and_its_adapters(sample_app: ServedApp) -> None:
    with sample_app.client() as client:
        response = client.get("/v1/models")
        assert response.status_code == 200, response.text
        cards = response.json()["data"]
        assert [card["id"] for card in cards] == [sample_app.model, *sample_app.adapters]
        assert all(card["object"] == "model" for card in cards)
        one = client.get(f"/v1/models/{sample_app.adapters[0]}")
        assert one.status_code == 200
        assert one.json()["id"] == sample_app.adapters[0]


def expected_text(
    tokenizer: Any, prompt_ids: list[int], max_tokens: int, adapter: str | None = None
) -> str:
    """What greedy decoding of the test model answers: its weights are built to decide each
    token by a wide margin (e2e/testmodel.py), so this holds on any CPU."""
    return str(tokenizer.decode(greedy_continuation(tokenizer, prompt_ids, max_tokens, adapter)))


def test_chat_completion_non_streaming(sample_app: ServedApp, tokenizer: Any) -> None:
    request = chat(sample_app.model, max_tokens=12)
    with sample_app.client() as client:
        response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == sample_app.model
    assert body["choices"][0]["message"]["role"] == "assistant"
    # The chat template was applied: the answer continues its generation prompt.
    prompt_ids = tokenizer.apply_chat_template(
        request["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert body["choices"][0]["message"]["content"] == expected_text(tokenizer, prompt_ids, 12)
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] > 0


def test_chat_completion_streaming_sends_sse_chunks_then_done(sample_app: ServedApp) -> None:
    with (
        sample_app.client() as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(sample_app.model, max_tokens=16, stream=True)
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    # The client did not ask for usage: the usage chunk the app requests for its metrics is
    # not passed on.
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_usage_is_passed_on_when_asked_for(sample_app: ServedApp) -> None:
    body = chat(sample_app.model, max_tokens=9, stream=True, stream_options={"include_usage": True})
    with (
        sample_app.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        events = sse_events(response)
    usage = [e["usage"] for e in events[:-1] if e.get("usage")]
    assert usage[-1]["completion_tokens"] == 9


def test_completions_streaming_and_not(sample_app: ServedApp, tokenizer: Any) -> None:
    request = {
        "model": sample_app.model,
        "prompt": "The tramontane is a wind",
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
    }
    with sample_app.client() as client:
        response = client.post("/v1/completions", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 10
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as stream:
            assert stream.status_code == 200
            events = sse_events(stream)
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    # Greedy decoding: the streamed text is the non-streamed one, and both are what the model
    # is built to answer.
    expected = expected_text(tokenizer, tokenizer(request["prompt"])["input_ids"], 10)
    assert body["choices"][0]["text"] == expected
    assert streamed == expected


def test_lora_adapter_is_selected_by_its_name(sample_app: ServedApp, tokenizer: Any) -> None:
    prompt = {
        "prompt": "Quarterly revenue of",
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    with sample_app.client() as client:
        base = client.post("/v1/completions", json={"model": sample_app.model, **prompt})
        adapter = client.post("/v1/completions", json={"model": "finance-reports", **prompt})
        other = client.post("/v1/completions", json={"model": "contracts-legal", **prompt})
    for response in (base, adapter, other):
        assert response.status_code == 200, response.text
    texts = [r.json()["choices"][0]["text"] for r in (base, adapter, other)]
    # Each test adapter forces a token of its own at every step; the base model continues the
    # prompt. So each name must give exactly its model's text, not just a different one.
    prompt_ids = tokenizer(prompt["prompt"])["input_ids"]
    expected = [
        expected_text(tokenizer, prompt_ids, 16, adapter=name)
        for name in (None, "finance-reports", "contracts-legal")
    ]
    assert len(set(expected)) == 3, expected
    assert texts == expected


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("unknown model", 404),
        ("malformed JSON", 400),
        ("negative max_tokens", 400),
        ("prompt longer than max_model_len", 400),
        ("adapter name in Ray's base:adapter form", 404),
        ("wrong types", 400),
        ("a JSON array instead of an object", 400),
        ("a 10 MB body", 413),
        ("a route of vLLM's that clients may not call", 404),
        ("GET on a generation route", 405),
    ],
)
def test_bad_requests_get_openai_style_4xx_errors(
    sample_app: ServedApp, case: str, status: int
) -> None:
    with sample_app.client() as client:
        if case == "malformed JSON":
            response = client.post(
                "/v1/chat/completions",
                content=b'{"model": "x", "messages": [',
                headers={"content-type": "application/json"},
            )
        elif case == "unknown model":
            response = client.post("/v1/chat/completions", json=chat("gpt-4o"))
        elif case == "wrong types":
            response = client.post(
                "/v1/chat/completions",
                json={"model": sample_app.model, "messages": "Bonjour", "max_tokens": "eight"},
            )
        elif case == "a JSON array instead of an object":
            response = client.post("/v1/completions", json=[sample_app.model, "Bonjour"])
        elif case == "a 10 MB body":
            response = client.post(
                "/v1/chat/completions", json=chat(sample_app.model, "a" * 10_000_000)
            )
        elif case == "a route of vLLM's that clients may not call":
            response = client.post("/tokenize", json={"prompt": "Bonjour"})
        elif case == "GET on a generation route":
            response = client.get("/v1/chat/completions")
        elif case == "negative max_tokens":
            response = client.post(
                "/v1/chat/completions", json=chat(sample_app.model, max_tokens=-5)
            )
        elif case == "prompt longer than max_model_len":
            long_prompt = " ".join(f"word{i}" for i in range(12_000))
            response = client.post("/v1/chat/completions", json=chat(sample_app.model, long_prompt))
        else:
            response = client.post(
                "/v1/chat/completions", json=chat(f"{sample_app.model}:finance-reports")
            )
    error = assert_openai_error(response, status)
    if case == "unknown model":
        assert "gpt-4o" in error["message"]


def test_requests_without_a_valid_key_get_401(sample_app: ServedApp) -> None:
    with sample_app.client(key=None) as client:
        missing = client.post("/v1/chat/completions", json=chat(sample_app.model))
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer sk-not-a-key"})
        # Probes need no key.
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    for response in (missing, wrong):
        error = assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready"}


def test_64_concurrent_streams_complete_without_errors(sample_app: ServedApp) -> None:
    from loadgen import run_load  # noqa: PLC0415 (e2e/loadgen.py, shared with the benchmark)

    report = asyncio.run(
        run_load(
            sample_app.url,
            sample_app.model,
            concurrency=64,
            requests_per_worker=1,
            max_tokens=32,
            headers={"Authorization": f"Bearer {sample_app.keys['app-a']}"},
        )
    )
    assert report.failures == 0, [r.error for r in report.results if not r.ok][:3]
    assert len(report.results) == 64
    assert all(r.completion_tokens == 32 for r in report.results)


def test_a_client_that_disconnects_mid_stream_aborts_its_engine_request(
    sample_app: ServedApp,
) -> None:
    """The engine stops generating for a client that is gone: its generated-tokens counter stops
    far short of the tokens asked for, and its running-requests gauge comes back to 0. (vLLM
    counts aborted requests nowhere else: its success counter has finished requests only.)"""
    url = sample_app.ray.metrics_url
    max_tokens = 8000  # minutes of generation here; the engine's context is 8192 tokens

    def engine(name: str) -> float:
        samples = ray_samples(url, "ray_vllm_")
        return metric(samples, name, model_name=sample_app.model)

    generated_before = engine("ray_vllm_generation_tokens_total")
    long_generation = {
        "model": sample_app.model,
        "prompt": "Bonjour",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        sample_app.client() as client,
        client.stream("POST", "/v1/completions", json=long_generation) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
    # Leaving the block closed the connection with nearly all of the generation still to come.
    assert received
    readings: list[float] = []

    def generation_stopped() -> float | None:
        readings.append(engine("ray_vllm_generation_tokens_total") - generated_before)
        stopped = len(readings) >= 2 and readings[-1] == readings[-2]
        idle = engine("ray_vllm_num_requests_running") == 0
        return readings[-1] if stopped and idle and readings[-1] > 0 else None

    # Ray's metrics agent exports every few seconds: equal readings 6 s apart mean it stopped.
    generated = eventually(generation_stopped, timeout=90, what="generation to stop", interval=6)
    assert generated < max_tokens / 2, readings


def ray_samples(url: str, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of Ray's metrics endpoint whose name starts with prefix."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                labels = tuple(sorted(sample.labels.items()))
                samples[(sample.name, labels)] = sample.value
    return samples


def usage_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Our usage metrics on the Ray metrics endpoint: (sample name, labels) → value."""
    return ray_samples(url, "ray_tramontane_")


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(labels.items()) <= set(sample_labels)
    )


def test_usage_metrics_count_per_tenant_deployment_model_and_key(sample_app: ServedApp) -> None:
    url = sample_app.ray.metrics_url
    key = "app-b"  # only this test uses it: its counters move by this test's requests alone
    base = {"tenant": "team-finance", "deployment": sample_app.name, "api_key": key}
    before = usage_samples(url)
    prompt_tokens = 0
    with sample_app.client(key=key) as client:
        for _ in range(3):
            response = client.post(
                "/v1/chat/completions", json=chat(sample_app.model, max_tokens=5)
            )
            assert response.status_code == 200
            prompt_tokens += response.json()["usage"]["prompt_tokens"]
        adapter = {
            "model": "finance-reports",
            "prompt": "EBITDA",
            "max_tokens": 7,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(2):
            with client.stream("POST", "/v1/completions", json=adapter) as stream:
                events = sse_events(stream)
            prompt_tokens += [e for e in events[:-1] if e.get("usage")][-1]["usage"][
                "prompt_tokens"
            ]
        assert client.post("/v1/chat/completions", json=chat("no-such-model")).status_code == 404

    def moved() -> dict[str, float] | None:
        after = usage_samples(url)
        delta = {
            "requests base": metric(
                after, "ray_tramontane_requests_total", model=sample_app.model, code="200", **base
            )
            - metric(
                before, "ray_tramontane_requests_total", model=sample_app.model, code="200", **base
            ),
            "requests adapter": metric(
                after, "ray_tramontane_requests_total", model="finance-reports", code="200", **base
            )
            - metric(
                before, "ray_tramontane_requests_total", model="finance-reports", code="200", **base
            ),
            "errors": metric(after, "ray_tramontane_request_errors_total", code="404", **base)
            - metric(before, "ray_tramontane_request_errors_total", code="404", **base),
            "completion tokens": metric(after, "ray_tramontane_completion_tokens_total", **base)
            - metric(before, "ray_tramontane_completion_tokens_total", **base),
            "prompt tokens": metric(after, "ray_tramontane_prompt_tokens_total", **base)
            - metric(before, "ray_tramontane_prompt_tokens_total", **base),
            "ttft observations": metric(
                after, "ray_tramontane_time_to_first_token_seconds_count", **base
            )
            - metric(before, "ray_tramontane_time_to_first_token_seconds_count", **base),
        }
        expected = {
            "requests base": 3,
            "requests adapter": 2,
            "errors": 1,
            "completion tokens": 3 * 5 + 2 * 7,
            "prompt tokens": prompt_tokens,
            "ttft observations": 2,  # streamed requests only
        }
        seen.append(delta)
        return delta if delta == expected else None

    seen: list[dict[str, float]] = []
    try:
        eventually(moved, timeout=60, what="usage counters to move", interval=2)
    except AssertionError as error:
        raise AssertionError(f"{error}; last deltas: {seen[-1] if seen else None}") from None
