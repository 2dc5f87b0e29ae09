"""The vLLM backend: Ray Serve LLM (`ray.serve.llm`) rendered from the same `AppConfig`.

`render` (AppConfig <-> Ray Serve LLM application), `batch` (vLLM's batch on a live app), `env` (the
cached venv the replicas run from, `llmserve-nb vllm-env`), `backend` (`VllmBackend`).
"""
from llmserve_nb.backends.vllm.backend import VllmBackend

__all__ = ["VllmBackend"]
