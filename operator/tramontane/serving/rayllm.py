"""Ray Serve LLM as the serving app uses it: the one file a Ray upgrade touches.

Every name of Ray Serve LLM that Tramontane uses is imported here, and only here; the other
serving modules import it from this module. Most are public (`ray.serve.llm`). Those from
`ray.llm._internal` are private: Ray may move or change them in any release, so after a Ray
upgrade check each of them (tests/serving runs the real engine through all of them):

- `LoraModelLoader` (the multiplexed LoRA loader: mirrors a bucket to local disk, keeps an LRU of
  the replica's adapters), `LoraMirrorConfig` and `DiskMultiplexConfig` (what it takes and
  returns), and `global_id_manager` (the integer ids vLLM wants for LoRA adapters): the public
  API only loads adapters from one bucket prefix for all of them, named `base:adapter`;
  Tramontane loads each adapter from its own URI (`tramontane.serving.adapters`);
- `to_model_metadata`: the model card that Ray Serve LLM's own `/v1/models` answers, so ours
  (adapters by their own names) are the same shape;
- `_add_middleware_to_built_app`: vLLM builds its app's middleware stack eagerly, so Starlette's
  `add_middleware` fails afterwards; this clears the stack first. Ray Serve LLM uses it for its
  own middleware; Tramontane's front goes around vLLM's app the same way
  (`tramontane.serving.server`).
"""

from __future__ import annotations

from ray.llm._internal.common.models import (  # type: ignore[import-not-found,unused-ignore]
    global_id_manager,
)
from ray.llm._internal.common.utils.cloud_utils import (  # type: ignore[import-not-found,unused-ignore]
    LoraMirrorConfig,
)
from ray.llm._internal.serve.core.configs.llm_config import (  # type: ignore[import-not-found,unused-ignore]
    DiskMultiplexConfig,
)
from ray.llm._internal.serve.core.configs.openai_api_models import (  # type: ignore[import-not-found,unused-ignore]
    to_model_metadata,
)
from ray.llm._internal.serve.core.server.llm_server import (  # type: ignore[import-not-found,unused-ignore]
    _add_middleware_to_built_app as add_middleware_to_built_app,
)
from ray.llm._internal.serve.utils.lora_serve_utils import (  # type: ignore[import-not-found,unused-ignore]
    LoraModelLoader,
)
from ray.serve.llm import (  # type: ignore[import-not-found,unused-ignore]
    LLMConfig,
    LLMServer,
    build_llm_deployment,
)

# Public (ray.serve.llm): LLMConfig, LLMServer, build_llm_deployment; the rest is private.
__all__ = [
    "DiskMultiplexConfig",
    "LLMConfig",
    "LLMServer",
    "LoraMirrorConfig",
    "LoraModelLoader",
    "add_middleware_to_built_app",
    "build_llm_deployment",
    "global_id_manager",
    "to_model_metadata",
]
