"""The serving package's layout: Ray Serve LLM's private API is imported in one module only."""

from __future__ import annotations

from tests.unit.test_images import ROOT, imported_modules

SERVING = ROOT / "operator" / "tramontane" / "serving"
RAYLLM = SERVING / "rayllm.py"


def _private(module: str) -> bool:
    """ray.llm._internal, or a private name (`_add_middleware_to_built_app`) of any Ray module."""
    parts = module.split(".")
    return parts[0] == "ray" and any(part.startswith("_") for part in parts)


def test_only_rayllm_imports_ray_serve_llms_private_api() -> None:
    """So that a Ray upgrade touches one file (tramontane.serving.rayllm says what and why)."""
    private = {
        path.name: sorted(m for m in imported_modules(path) if _private(m))
        for path in sorted(SERVING.glob("*.py"))
    }
    assert private.pop(RAYLLM.name), "rayllm.py imports nothing private: the scan is broken"
    assert not {name: found for name, found in private.items() if found}
