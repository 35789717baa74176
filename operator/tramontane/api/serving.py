"""The contract between the operator and the serving app.

The operator renders `ServingArgs` into the RayService's serveConfigV2 (`args` of the
application); `tramontane.serving` parses the same model. Both sides import it from here, so a
field renamed on one side breaks a test on the other instead of a production deployment.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tramontane.api.base import ApiModel
from tramontane.api.v1alpha1 import Adapter, EngineConfig, ModelDeployment

API_KEYS_MOUNT_PATH = "/etc/tramontane/api-keys"
# pvc://claim/path URIs: the operator mounts each claim read-only at MODEL_ROOT/<claim> in the
# serving pods, and the app resolves the URIs against it (TRAMONTANE_MODEL_ROOT overrides it
# where there are no pods: local runs and tests).
MODEL_ROOT = "/mnt/models"

# Ray Serve's settings for Tramontane's serving topology, set on every Ray container of a
# RayService (tramontane.render.rayservice) and on the local Ray instance of tests and benchmarks:
# - HAProxy is the HTTP ingress instead of Serve's Python proxy, and turns on direct ingress: the
#   ingress replica serves HTTP itself, on a port of its own (tramontane.serving.app makes the
#   engine's replica that ingress: no Python hop between HAProxy and the engine);
# - user code runs on the replica's own event loop: no ASGI message crosses event loops.
RAY_SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


class ServingModel(ApiModel):
    uri: str = Field(description="Model URI from spec.model.uri (or a local path in dev).")
    revision: str | None = None
    served_name: str


class ServingAccelerator(ApiModel):
    type: str
    gpus: int = Field(ge=0, le=8, description="GPUs per replica (0 on CPU).")


class ServingAutoscaling(ApiModel):
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)
    initial_replicas: int = Field(ge=0)
    target_ongoing_requests: int = Field(ge=1)
    upscale_delay_seconds: int = Field(ge=0)
    downscale_delay_seconds: int = Field(ge=0)

    def serve_config(self) -> dict[str, Any]:
        """Ray Serve's autoscaling_config of the engine deployment."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_seconds,
            "downscale_delay_s": self.downscale_delay_seconds,
        }


def engine_deployment_name(served_name: str) -> str:
    """The Ray Serve deployment of a model's engines (LLMServer replicas): named here, not by
    Ray Serve LLM, because the Serve config overrides its autoscaling by that name."""
    return f"TramontaneLLMServer:{served_name}"


class ServingArgs(ApiModel):
    """`args` of the Ray Serve application that tramontane.serving builds."""

    IMPORT_PATH: ClassVar[str] = "tramontane.serving.app:build_app"

    tenant: str = Field(description="Tenant (namespace) label of metrics and spans.")
    deployment: str = Field(description="ModelDeployment name, label of metrics and spans.")
    model: ServingModel
    adapters: list[Adapter] = Field(default_factory=list)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    accelerator: ServingAccelerator
    autoscaling: ServingAutoscaling | None = Field(
        default=None,
        description="The engine deployment's autoscaling. The operator leaves it out of the "
        "application's args and sets it in the Serve config's deployment override instead: a "
        "change of args redeploys every replica (Serve gives the code a new version), an "
        "override's autoscaling is applied in place.",
    )
    api_keys_path: str | None = Field(
        default=API_KEYS_MOUNT_PATH,
        description="Directory of the mounted API-key Secret; None disables authentication.",
    )

    @classmethod
    def from_model_deployment(cls, md: ModelDeployment) -> ServingArgs:
        spec = md.spec
        return cls(
            tenant=md.namespace,
            deployment=md.name,
            model=ServingModel(
                uri=spec.model.uri, revision=spec.model.revision, served_name=md.served_name
            ),
            adapters=list(spec.adapters),
            engine=spec.engine,
            accelerator=ServingAccelerator(
                type=spec.accelerator.type.value, gpus=spec.accelerator.gpus
            ),
            autoscaling=ServingAutoscaling(
                min_replicas=spec.scaling.min_replicas,
                max_replicas=spec.scaling.max_replicas,
                initial_replicas=spec.desired_replicas,
                target_ongoing_requests=spec.scaling.target_ongoing_requests,
                upscale_delay_seconds=spec.scaling.upscale_delay_seconds,
                downscale_delay_seconds=spec.scaling.downscale_delay_seconds,
            ),
        )
