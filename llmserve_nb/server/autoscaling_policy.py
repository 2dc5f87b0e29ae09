"""LLM-aware autoscaling: a Serve custom autoscaling policy on what LLM users feel.

Serve's default policy keeps `target_ongoing_requests` per replica. With continuous batching a replica
runs many requests at once, so "ongoing" says little about whether users wait. Here each replica
reports its *pressure* (`LLMServer.record_autoscaling_stats`): the larger of

- requests waiting for a decode slot / `target_waiting_requests`, and
- p90 time to first token over the last 30 s / `target_ttft_s`,

so 1.0 means "on target". The policy asks for `current replicas × mean pressure` (Serve then applies
min/max, the up/down-scale delays and the scaling factors, as for every custom policy). The targets
travel in the deployment's user_config, so `ServeTuner` changes them in place; switching between this
policy and Serve's default is a code-version change for Serve and restarts the replicas.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PRESSURE_METRIC", "llm_policy"]

PRESSURE_METRIC = "llm_pressure"


def llm_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve custom autoscaling policy (`AutoscalingConfig(policy="llm")`)."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    pressure = (ctx.aggregated_metrics or {}).get(PRESSURE_METRIC) or {}
    if ctx.current_num_replicas == 0 or not pressure:
        # Nothing reported yet (replicas starting): Serve's own policy decides meanwhile.
        return replica_queue_length_autoscaling_policy(ctx)
    mean = sum(pressure.values()) / len(pressure)
    return ctx.current_num_replicas * mean, {"llm_pressure": mean}
