"""vLLM's batch on a live app, in place of the transformers app's `/stats`: its running and waiting request
gauges as Ray exports them on every node's metrics endpoint (`Cluster.metrics_urls()`).

Ray Serve LLM has no `/stats` and no live `max_batch_size` (vLLM batches continuously inside its engine, up
to `engine.max_num_seqs`). Ray exports the gauges every few seconds, so a short burst may read fewer
requests than vLLM had.
"""
from __future__ import annotations

from typing import Any, Callable

from llmserve_nb.backends.burst import burst_figures, burst_load

__all__ = ["BATCH_METRICS", "batch_of", "batch_sampler", "burst"]

# Our names -> vLLM's gauges as Ray exports them.
BATCH_METRICS = {"running": "ray_vllm_num_requests_running", "waiting": "ray_vllm_num_requests_waiting"}
SAMPLE_EVERY_S = 0.5


def batch_of(metrics_urls: list[str], timeout_s: float = 5.0) -> dict[str, float]:
    """vLLM's running and waiting requests, each gauge summed over its label sets and the given endpoints."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {metric: ours for ours, metric in BATCH_METRICS.items()}
    total = dict.fromkeys(BATCH_METRICS, 0.0)
    for url in metrics_urls:
        r = httpx.get(url, timeout=timeout_s)
        r.raise_for_status()
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name in wanted:
                    total[wanted[sample.name]] += sample.value
    return total


def _sampler(metrics_urls: list[str]) -> Callable[[], dict[str, float]]:
    return lambda: batch_of(metrics_urls, timeout_s=2.0)


def batch_sampler(app: Any) -> Callable[[], dict[str, float]]:
    return _sampler(app.cluster.metrics_urls())


def burst(app: Any, n: int, max_tokens: int, input_tokens: int) -> dict[str, Any]:
    """`n` concurrent completions while vLLM's running gauge is sampled every `SAMPLE_EVERY_S`. Without a
    reachable metrics endpoint (e.g. a port-forward to the dashboard only) the batch view is left out and
    `batch_view` says why; the burst itself still runs."""
    from llmserve_nb.bench import run_observed

    samplers: dict[str, Callable[[], dict[str, float]]] = {}
    try:
        urls = app.cluster.metrics_urls()
        if urls:
            batch_of(urls, timeout_s=2.0)
    except Exception as e:  # whatever fails here costs the batch view only
        view = f"metrics endpoint not reachable ({type(e).__name__}: {e})"
    else:
        if urls:
            samplers["batch"] = _sampler(urls)
        view = (f"{BATCH_METRICS['running']} from {len(urls)} node(s), sampled every {SAMPLE_EVERY_S:g} s; Ray "
                "exports it every few seconds, so a short burst reads low" if urls else "no metrics endpoint found")
    timeline = run_observed(burst_load(app, n, max_tokens, input_tokens), samplers, every_s=SAMPLE_EVERY_S)
    running = [batch["running"] for batch in timeline.values("batch")]
    return {
        **burst_figures(timeline.result, n),
        "completed": timeline.result.summary()["completed"],
        "vllm_running_max": max(running, default=None),
        "vllm_running_samples": running,
        "batch_view": view,
    }
