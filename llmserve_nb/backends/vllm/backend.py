"""`VllmBackend`: vLLM through Ray Serve LLM, behind the `Backend` interface (render.py renders, batch.py
reads the engine's batch on a live app)."""
from __future__ import annotations

from typing import Any, Callable

from llmserve_nb.backends.base import Backend
from llmserve_nb.backends.vllm import batch, render
from llmserve_nb.config import AppConfig

__all__ = ["VllmBackend"]


class VllmBackend(Backend):
    name = "vllm"
    import_path = render.IMPORT_PATH
    metric_prefix = "ray_vllm"
    # vLLM's `vllm:*` metrics as its Ray stat logger renames them.
    engine_metrics = frozenset(
        f"ray_vllm_{m}"
        for m in (
            "time_to_first_token_seconds",
            "request_time_per_output_token_seconds",
            "e2e_request_latency_seconds",
            "prompt_tokens_total",
            "generation_tokens_total",
            "request_success_total",
            "num_requests_running",
            "num_requests_waiting",
            "kv_cache_usage_perc",
        )
    )
    # Ray's OpenAI ingress counts no requests of its own; Serve's proxy counts every HTTP answer.
    http_requests = ("ray_serve_num_http_requests_total", "status_code")
    live_batching = False  # vLLM batches continuously inside its engine, up to engine.max_num_seqs
    replica_stats = False
    # The llm policy reads the transformers replica's own statistics, which an LLMServer does not have.
    autoscaling_policies = ("ongoing_requests",)

    def check(self, config: AppConfig) -> None:
        super().check(config)
        render.check(config)

    def application(self, config: AppConfig) -> dict[str, Any]:
        return render.application(config)

    def config_of(self, app: dict[str, Any]) -> AppConfig:
        return render.config_of(app)

    def deployment_names(self, config: AppConfig) -> list[str]:
        # With direct streaming Ray's LLMRouter takes the ingress's place (see render.direct_streaming).
        front = render.ROUTER_DEPLOYMENT if render.direct_streaming(config) else render.INGRESS_DEPLOYMENT
        return [render.llm_server_deployment_name(config.engine.model_name), front]

    def engine_selector(self, config: AppConfig) -> str:
        # vLLM's metrics carry model_name only.
        return f'model_name="{config.engine.model_name}"'

    def cluster_env(self, config: AppConfig) -> dict[str, str]:
        return dict(render.HIGH_THROUGHPUT_ENV)

    def batch_sampler(self, app: Any) -> Callable[[], dict[str, float]]:
        return batch.batch_sampler(app)

    def burst(self, app: Any, n: int, max_tokens: int, input_tokens: int) -> dict[str, Any]:
        return batch.burst(app, n, max_tokens, input_tokens)
