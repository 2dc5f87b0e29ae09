"""Metric names and PromQL of the served app, with no Ray import.

The replicas export these metrics (`llmserve_nb.server.metrics`), named and bucketed like vLLM's
(`vllm:time_to_first_token_seconds` -> `ray_llmserve_time_to_first_token_seconds`); the k8s dashboard
and alerts, `LiveMonitor` and the tests read the names and queries from here, so a notebook or a
manifest renderer never imports the serving side.
"""
from __future__ import annotations

from llmserve_nb.config import DEPLOYMENT_NAME

__all__ = ["METRIC_NAMES", "PREFIX", "PROMQL", "queries"]

PREFIX = "ray_llmserve_"

# Exported name -> Prometheus type. The k8s dashboard/alert renderer and the tests read this.
METRIC_NAMES: dict[str, str] = {
    f"{PREFIX}time_to_first_token_seconds": "histogram",
    f"{PREFIX}request_time_per_output_token_seconds": "histogram",
    f"{PREFIX}e2e_request_latency_seconds": "histogram",
    f"{PREFIX}admission_batch_size": "histogram",
    f"{PREFIX}prompt_tokens_total": "counter",
    f"{PREFIX}generation_tokens_total": "counter",
    f"{PREFIX}request_success_total": "counter",
    f"{PREFIX}http_requests_total": "counter",
    f"{PREFIX}num_requests_running": "gauge",
    f"{PREFIX}num_requests_waiting": "gauge",
    f"{PREFIX}kv_cache_usage_perc": "gauge",
}


def queries(window: str = "1m", selector: str = "") -> dict[str, str]:
    """The canonical PromQL of the dashboard, the alerts and `LiveMonitor`, one value each.

    `window` is the rate window: with Ray's 10 s metrics report interval, keep it at 30 s or more.
    `selector` narrows every query with extra label matchers that both these metrics and Ray Serve's
    carry, in practice the application: `'application="llm"'` or, in Grafana, `'application=~"$app"'`.
    """
    s = f",{selector}" if selector else ""
    m = f"{{{selector}}}" if selector else ""
    dep = f'{{deployment="{DEPLOYMENT_NAME}"{s}}}'

    def quantile(q: float, name: str) -> str:
        return f"histogram_quantile({q}, sum by (le) (rate({PREFIX}{name}_bucket{m}[{window}])))"

    http = f"{PREFIX}http_requests_total"
    errors = f'sum(rate({http}{{status=~"5.."{s}}}[{window}]))'
    return {
        "ttft_p50_s": quantile(0.5, "time_to_first_token_seconds"),
        "ttft_p99_s": quantile(0.99, "time_to_first_token_seconds"),
        "tpot_p50_s": quantile(0.5, "request_time_per_output_token_seconds"),
        "e2e_p99_s": quantile(0.99, "e2e_request_latency_seconds"),
        "requests_running": f"sum({PREFIX}num_requests_running{m})",
        "requests_waiting": f"sum({PREFIX}num_requests_waiting{m})",
        "kv_cache_usage": f"max({PREFIX}kv_cache_usage_perc{m})",
        "generation_tokens_per_s": f"sum(rate({PREFIX}generation_tokens_total{m}[{window}]))",
        "requests_per_s": f"sum(rate({http}{m}[{window}]))",
        # `or vector(0)`: no 5xx series exists until the first error, and "no data" is not "no errors".
        "errors_per_s": f"{errors} or vector(0)",
        "error_ratio": f"({errors} or vector(0)) / sum(rate({http}{m}[{window}]))",
        # Serve's own: the controller's target, and one series per replica that is 1 while it is healthy.
        "replicas_target": f"sum(ray_serve_autoscaling_target_replicas{dep})",
        "replicas_running": f"sum(ray_serve_deployment_replica_healthy{dep})",
    }


PROMQL: dict[str, str] = queries()
