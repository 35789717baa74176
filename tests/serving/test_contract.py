"""The operator's rendered serveConfigV2 runs as is on Ray Serve (one contract, both sides)."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import ServedApp

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


def test_on_cpu_only_the_engine_asks_ray_for_a_cpu(sample_app: ServedApp) -> None:
    """A CPU worker pod of N cores hosts N engines: the ingress and the engine's replica actor
    ask no CPU of their own (the Ray head, which offers none, can host the ingress)."""
    status = httpx.get(f"{sample_app.ray.dashboard}/api/serve/applications/", timeout=30).json()
    deployments = status["applications"][sample_app.name]["deployments"]
    (engine_name,) = [name for name in deployments if name.startswith("TramontaneLLMServer:")]
    ingress = deployments["TramontaneIngress"]["deployment_config"]
    engine = deployments[engine_name]["deployment_config"]
    assert ingress["ray_actor_options"]["num_cpus"] == 0
    assert engine["ray_actor_options"]["num_cpus"] == 0
