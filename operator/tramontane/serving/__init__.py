"""The Ray Serve application (ray.serve.llm + vLLM) that RayServices import. Never imports kopf."""
