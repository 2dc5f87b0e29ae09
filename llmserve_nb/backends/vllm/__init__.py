"""The vLLM backend: Ray Serve LLM (`ray.serve.llm`) rendered from the same `AppConfig`."""
