"""Per-tenant usage metrics of the serving app, exported through Ray's metrics agent.

A Ray Serve replica is one of several processes of a pod; Ray's own metrics agent gathers what
each of them records and serves it on the pod's metrics port, which the PodMonitor scrapes
(prometheus-client's registry would only be visible inside the replica's process). Ray prefixes
the names with `ray_`: `ray_tramontane_requests_total`, `ray_tramontane_prompt_tokens_total`,
`ray_tramontane_completion_tokens_total`, `ray_tramontane_request_errors_total`,
`ray_tramontane_time_to_first_token_seconds_bucket`.

Labels: tenant, deployment, model (the name the client asked for: base model or adapter), api_key
(the name of the key in the tenant's Secret: which application consumed what), and code (HTTP
status) on requests and errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ray.util.metrics, not ray.serve.metrics: the latter reserves the tag "deployment" (a Serve
# deployment there, a ModelDeployment here) and adds per-replica tags nobody bills by.
from ray.util import metrics  # type: ignore[import-not-found,unused-ignore]

USAGE_TAGS = ("tenant", "deployment", "model", "api_key")
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
UNKNOWN = "unknown"


@dataclass
class UsageMetrics:
    requests: Any = field(init=False)
    errors: Any = field(init=False)
    prompt_tokens: Any = field(init=False)
    completion_tokens: Any = field(init=False)
    time_to_first_token: Any = field(init=False)

    def __post_init__(self) -> None:
        coded = (*USAGE_TAGS, "code")
        self.requests = metrics.Counter(
            "tramontane_requests",
            description="OpenAI API requests answered, by HTTP status code.",
            tag_keys=coded,
        )
        self.errors = metrics.Counter(
            "tramontane_request_errors",
            description="Requests answered with an error (4xx/5xx, or an error inside a stream).",
            tag_keys=coded,
        )
        self.prompt_tokens = metrics.Counter(
            "tramontane_prompt_tokens",
            description="Prompt tokens processed.",
            tag_keys=USAGE_TAGS,
        )
        self.completion_tokens = metrics.Counter(
            "tramontane_completion_tokens",
            description="Completion tokens generated.",
            tag_keys=USAGE_TAGS,
        )
        self.time_to_first_token = metrics.Histogram(
            "tramontane_time_to_first_token_seconds",
            description="Time from the request reaching the app to its first generated text.",
            boundaries=TTFT_BOUNDARIES,
            tag_keys=USAGE_TAGS,
        )
