"""Entry point that the RayService's serveConfigV2 imports (`tramontane.serving.app:build_app`).

Ray Serve calls build_app with the application's `args`; they follow the operator's contract,
tramontane.api.serving.ServingArgs. The Ray Serve LLM + vLLM application itself is the serving
runtime's work (issue 5); until it lands, a RayService fails to deploy with the error below
instead of serving something that is not Tramontane's.
"""

from __future__ import annotations

from typing import Any

from tramontane.api.serving import ServingArgs


def parse_args(args: dict[str, Any]) -> ServingArgs:
    """Validate the args Ray Serve passes in (the operator rendered them from the same model)."""
    return ServingArgs.model_validate(args)


def build_app(args: dict[str, Any]) -> Any:
    parsed = parse_args(args)
    raise NotImplementedError(
        f"serving runtime for {parsed.tenant}/{parsed.deployment} is not built yet "
        "(Ray Serve LLM application: issue 5)"
    )
