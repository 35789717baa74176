"""Serve's autoscaler adds vLLM replicas under load and removes them after, losing no request."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kube import eventually
from tests.serving.conftest import MODELS_CLAIM, SERVE_URL, ServedApp
from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import serve_config

pytestmark = pytest.mark.serving

LOAD_SECONDS = 240
CONCURRENCY = 24
REPORT = Path(__file__).resolve().parents[2] / ".ray" / "autoscaling-figures.json"


def autoscaling_deployment(test_model: Path) -> ModelDeployment:
    return ModelDeployment.from_body(
        {
            "apiVersion": "tramontane.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "autoscale", "namespace": "team-finance"},
            "spec": {
                "model": {"uri": f"pvc://{MODELS_CLAIM}/{test_model.name}"},
                "engine": {"maxModelLen": 1024},
                "accelerator": {"type": "CPU", "count": 0},
                "scaling": {
                    "minReplicas": 1,
                    "maxReplicas": 3,
                    # 24 streams / 8 per replica: the autoscaler wants 3 replicas.
                    "targetOngoingRequests": 8,
                    "upscaleDelaySeconds": 5,
                    "downscaleDelaySeconds": 20,
                },
            },
        }
    )


def test_replicas_scale_up_under_load_and_back_down_after(
    sample_app: ServedApp, test_model: Path, api_keys: tuple[Path, dict[str, str]]
) -> None:
    from loadgen import LoadReport, run_load  # noqa: PLC0415 (e2e/loadgen.py)

    md = autoscaling_deployment(test_model)
    args = ServingArgs.from_model_deployment(md).model_copy(
        update={"api_keys_path": str(api_keys[0])}
    )
    app: dict[str, Any] = serve_config(md, args)["applications"][0]
    app["route_prefix"] = "/autoscale"  # beside the sample app on the same Serve instance
    ray = sample_app.ray
    ray.deploy({**sample_app.config, "applications": [*sample_app.config["applications"], app]})
    ray.wait_running([app["name"]], timeout=900)

    def serving_replicas() -> int:
        replicas = ray.replicas(app["name"], "TramontaneLLMServer")
        return sum(1 for replica in replicas if replica.get("state") == "RUNNING")

    assert serving_replicas() == 1
    reports: list[LoadReport] = []

    def load() -> None:
        reports.append(
            asyncio.run(
                run_load(
                    f"{SERVE_URL}/autoscale",
                    md.served_name,
                    concurrency=CONCURRENCY,
                    duration_s=LOAD_SECONDS,
                    max_tokens=128,
                    headers={"Authorization": f"Bearer {api_keys[1]['app-a']}"},
                )
            )
        )

    started = time.monotonic()
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    reached: dict[int, float] = {}
    while worker.is_alive():
        count = serving_replicas()
        for n in range(2, count + 1):
            reached.setdefault(n, round(time.monotonic() - started, 1))
        time.sleep(1)
    load_ended = time.monotonic()
    report = reports[0]

    eventually(
        lambda: serving_replicas() == 1, timeout=300, what="scale-down to 1 replica", interval=1
    )
    scaled_down_after = round(time.monotonic() - load_ended, 1)
    figures = {
        "load_seconds": LOAD_SECONDS,
        "concurrency": CONCURRENCY,
        "requests": len(report.results),
        "failed_requests": report.failures,
        "output_tokens_per_s": round(report.output_tokens_per_s, 1),
        "seconds_from_load_start_to_replica_serving": reached,
        "seconds_from_load_end_to_one_replica": scaled_down_after,
    }
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    print("autoscaling:", json.dumps(figures))

    assert report.failures == 0, [r.error for r in report.results if not r.ok][:3]
    assert 2 in reached, f"no second replica served within {LOAD_SECONDS}s of load: {figures}"
