"""The operator's rendered serveConfigV2 runs as is on Ray Serve (one contract, both sides)."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.served_app import ServedApp

pytestmark = pytest.mark.serving


def test_rendered_sample_config_deploys_and_answers(sample_app: ServedApp) -> None:
    app = sample_app.config["applications"][0]
    assert app["import_path"] == "tramontane.serving.app:build_app"
    with sample_app.client() as client:
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        ids = [card["id"] for card in models.json()["data"]]
        assert ids == [sample_app.model, *sample_app.adapters]
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": sample_app.model,
                "messages": [{"role": "user", "content": "Bonjour"}],
                "max_tokens": 8,
            },
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == sample_app.model
        assert body["usage"]["completion_tokens"] == 8


def test_the_engine_replica_is_the_only_deployment_and_asks_no_cpu_of_its_own(
    sample_app: ServedApp,
) -> None:
    """No Python hop in front of the engine: the application is the engine's deployment alone
    (HAProxy reaches its replicas directly). On CPU its replica actor asks Ray for no CPU of its
    own (the engine's placement bundle stands for the cores), so a worker of N cores hosts N."""
    status = httpx.get(f"{sample_app.ray.dashboard}/api/serve/applications/", timeout=30).json()
    deployments = status["applications"][sample_app.name]["deployments"]
    assert list(deployments) == [f"TramontaneLLMServer:{sample_app.model}"]
    (engine,) = deployments.values()
    assert engine["deployment_config"]["ray_actor_options"]["num_cpus"] == 0
