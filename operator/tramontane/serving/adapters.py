"""LoRA adapters by their own names, each loaded from its own URI (a local folder or a bucket).

Ray Serve LLM's loader knows one bucket prefix for all adapters and names them `base:adapter`.
A ModelDeployment names each adapter and gives each its own URI; the replica
(`tramontane.serving.server`) registers each in vLLM under its own name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tramontane.serving.rayllm import (
    DiskMultiplexConfig,
    LoraMirrorConfig,
    LoraModelLoader,
    global_id_manager,
)


class AdapterLoader(LoraModelLoader):  # type: ignore[misc]
    """Loads the deployment's adapters by name from their own URIs (local folder or bucket)."""

    sources: ClassVar[dict[str, str]] = {}

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        name = lora_model_id.partition(":")[2]
        source = self.sources.get(name)
        if source is None:
            raise ValueError(f"unknown adapter {name!r}")
        if source.startswith("/"):
            # A mounted volume: vLLM reads the folder in place, nothing to copy.
            if lora_model_id not in self.disk_cache:
                self.disk_cache[lora_model_id] = DiskMultiplexConfig(
                    model_id=lora_model_id,
                    max_total_tokens=None,
                    local_path=source,
                    lora_assigned_int_id=global_id_manager.next(),
                )
            return self.disk_cache[lora_model_id]
        mirror = LoraMirrorConfig(
            lora_model_id=lora_model_id, bucket_uri=source, max_total_tokens=None
        )
        return await self.load_model(lora_model_id, mirror)


def adapter_loader(sources: dict[str, str]) -> type[AdapterLoader]:
    """The loader class of one deployment (Ray Serve LLM instantiates it): name → source."""
    return type("DeploymentAdapterLoader", (AdapterLoader,), {"sources": sources})
