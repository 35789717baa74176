"""Pure functions from API models to Kubernetes manifests (dicts). No client, no I/O."""
