"""Fixtures of the serving tests: the real engine (vLLM CPU build) under Ray Serve LLM.

They run in the serving environment (.venv-serving, requirements/serving.lock), which `make test`
uses for the whole suite. One local Ray instance serves the whole session: starting an engine
costs about a minute on 2 cores, so every test shares the sample deployment.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localray import LocalRay, running
from testmodel import ensure_adapter, ensure_model, load_tokenizer
from tests.otelcol import Collector
from tests.serving.served_app import MODELS_CLAIM, SERVE_URL, ServedApp
from tramontane.api.serving import ServingArgs
from tramontane.api.v1alpha1 import ModelDeployment
from tramontane.render.rayservice import serve_config

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "config" / "samples" / "modeldeployment.yaml"


@pytest.fixture(scope="session")
def test_model() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def tokenizer(test_model: Path) -> Any:
    """The test model's tokenizer, to compute what the model must answer (its design is known)."""
    return load_tokenizer(test_model)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory, test_model: Path) -> Path:
    """Stands for the volume mounts of a pod: <root>/<claim> is the claim `test-models`."""
    root = tmp_path_factory.mktemp("model-root")
    (root / MODELS_CLAIM).symlink_to(test_model.parent, target_is_directory=True)
    return root


def sample_deployment(test_model: Path) -> ModelDeployment:
    """config/samples/modeldeployment.yaml with its model and adapters on the test "PVC", on CPU.

    The accelerator has to change too: for GPU accelerators Ray Serve LLM runs vLLM with its Ray
    executor, which vLLM's CPU build refuses ("current platform cpu does not support ray"). The
    H100 rendering is checked without the engine (test_config.py).
    """
    body = yaml.safe_load(SAMPLE.read_text())
    body["spec"]["model"]["uri"] = f"pvc://{MODELS_CLAIM}/{test_model.name}"
    for adapter in body["spec"]["adapters"]:
        path = ensure_adapter(test_model, adapter["name"])
        adapter["uri"] = f"pvc://{MODELS_CLAIM}/{path.parent.name}/{path.name}"
    body["spec"]["accelerator"] = {"type": "CPU", "count": 0}
    return ModelDeployment.from_body(body)


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder laid out like the mounted `<deployment>-api-keys` Secret: one file per key."""
    folder = tmp_path_factory.mktemp("api-keys")
    keys = {name: f"sk-{secrets.token_urlsafe(24)}" for name in ("app-a", "app-b")}
    for name, key in keys.items():
        (folder / name).write_text(key + "\n")
    return folder, keys


@pytest.fixture(scope="session")
def local_ray(model_root: Path, otel_collector: Collector) -> Iterator[LocalRay]:
    """The session's Ray instance, its processes configured as the operator renders a pod's:
    tracing to an OTLP endpoint (the test collector), spans batched briefly for the tests."""
    ray = LocalRay(
        env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TRAMONTANE_MODEL_ROOT": str(model_root),
            "OTEL_EXPORTER_OTLP_ENDPOINT": otel_collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    with running(ray):
        yield ray


@pytest.fixture(scope="session")
def sample_config(test_model: Path, api_keys: tuple[Path, dict[str, str]]) -> dict[str, Any]:
    """The serveConfigV2 the operator renders for the sample (only the keys' folder differs)."""
    md = sample_deployment(test_model)
    args = ServingArgs.from_model_deployment(md).model_copy(
        update={"api_keys_path": str(api_keys[0])}
    )
    config: dict[str, Any] = serve_config(md, args)
    return config


@pytest.fixture(scope="session")
def sample_app(
    local_ray: LocalRay, sample_config: dict[str, Any], api_keys: tuple[Path, dict[str, str]]
) -> ServedApp:
    local_ray.deploy(sample_config)
    app = sample_config["applications"][0]
    local_ray.wait_running([app["name"]], timeout=900)
    args = ServingArgs.model_validate(app["args"])
    return ServedApp(
        url=SERVE_URL,
        name=app["name"],
        model=args.model.served_name,
        adapters=tuple(adapter.name for adapter in args.adapters),
        keys=api_keys[1],
        ray=local_ray,
        config=sample_config,
    )
