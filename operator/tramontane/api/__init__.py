"""Pydantic models of the tramontane.dev CRDs: the single source of truth for their schemas."""
