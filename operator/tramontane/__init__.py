"""Tramontane: LLM deployments on Kubernetes with tenants, data residency and quotas."""

__version__ = "0.1.0"
