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

__all__ = ["PRESSURE_METRIC", "llm_policy", "policy_comparison", "scale_up_run"]

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


def scale_up_run(cluster, config, *, concurrency: int = 24, seconds: float = 60.0, max_tokens: int = 64,
                 api_key: str | None = None, progress=None) -> dict[str, Any]:
    """Deploy `config`, drive a closed-loop load for `seconds`, and report how the autoscaler responded:
    seconds until Serve's target replica count first rose, seconds until a second replica RUNNING, the
    replica timeline, and the load's TTFT percentiles. The app is deleted afterwards."""
    import threading
    import time

    from llmserve_nb.bench import Workload, run_benchmark
    from llmserve_nb.config import DEPLOYMENT_NAME

    app = cluster.deploy(config, progress=progress)
    workload = Workload(num_requests=100000, input_tokens=30, output_tokens=max_tokens, duration_s=seconds,
                        timeout_s=max(60.0, seconds), stream=True)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.setdefault("run", run_benchmark(
        app.base_url, workload, concurrency=concurrency, model=app.model, progress=False,
        api_key=api_key or app.api_key)), daemon=True)
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    runner.start()
    try:
        while runner.is_alive():
            dep = (cluster.serve_details().get("applications", {}).get(config.name, {})
                   .get("deployments", {}).get(DEPLOYMENT_NAME, {}))
            running = sum(r.get("state") == "RUNNING" for r in dep.get("replicas") or [])
            timeline.append({"t_s": round(time.monotonic() - t0, 1), "target": dep.get("target_num_replicas"),
                             "running": running})
            runner.join(timeout=1.0)
    finally:
        app.shutdown()
    summary = result["run"].summary() if "run" in result else {}

    def first(pred) -> float | None:
        return next((row["t_s"] for row in timeline if pred(row)), None)

    start = timeline[0]["running"] if timeline else 1
    return {
        "policy": config.deployment.autoscaling.policy if config.deployment.autoscaling else "fixed",
        "target_rose_s": first(lambda r: (r["target"] or 0) > start),
        "second_replica_running_s": first(lambda r: r["running"] > start),
        "max_running": max((r["running"] for r in timeline), default=0),
        "ttft_ms_p50": summary.get("ttft_ms_p50"),
        "ttft_ms_p99": summary.get("ttft_ms_p99"),
        "output_tok_per_s": summary.get("output_tok_per_s"),
        "completed": summary.get("completed"),
        "errors": summary.get("errors"),
        "timeline": timeline,
    }


POLICY_COLUMNS = ("scale_up_decided_s", "scale_up_s", "ttft_ms_p50", "ttft_ms_p99", "output_tok_per_s", "completed", "errors")


def policy_comparison(runs: dict[str, dict[str, Any]]):
    """One row per policy from load-run summaries on the same load (`ServeTuner.last_load`, or
    `scale_up_run`'s report, with `target_rose_s` and `second_replica_running_s`): seconds until Serve decided
    to add a replica and until it ran, TTFT percentiles, useful tokens/s and the request outcome."""
    import pandas as pd

    rows = []
    for policy, run in runs.items():
        row = {"policy": policy, **{k: run.get(k) for k in POLICY_COLUMNS}}
        if row["scale_up_decided_s"] is None:
            row["scale_up_decided_s"] = run.get("target_rose_s")
        if row["scale_up_s"] is None:
            row["scale_up_s"] = run.get("second_replica_running_s")
        rows.append(row)
    return pd.DataFrame(rows).set_index("policy")
