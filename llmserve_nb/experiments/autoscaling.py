"""Autoscaling policies compared on the same load: how soon Serve decided to add a replica, how soon it
ran, and what users saw meanwhile (`notebooks/02_tune_autoscaling.ipynb` through `ServeTuner`,
`benchmarks/autoscaling_policies.py`). The policy itself is `llmserve_nb.server.autoscaling_policy`.

`load_and_watch` is the load both run: a closed-loop streaming load under `run_observed`, with the
model deployment's Serve status sampled every second; `scale_up_times` reads the scale-up from it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from llmserve_nb.backends import backend_for
from llmserve_nb.bench import BenchRun, Timeline, Workload, run_benchmark, run_observed

if TYPE_CHECKING:
    from llmserve_nb.cluster import AppHandle, Cluster

__all__ = ["POLICY_COLUMNS", "load_and_watch", "policy_comparison", "replica_counts", "scale_up_run", "scale_up_times"]

POLICY_COLUMNS = ("scale_up_decided_s", "scale_up_s", "ttft_ms_p50", "ttft_ms_p99", "output_tok_per_s", "completed",
                  "errors")


def scale_up_times(counts: Sequence[tuple[float, int, int | None]]) -> dict[str, float | None]:
    """From (seconds, running replicas, target replicas) samples: `scale_up_decided_s`, seconds from the
    first sample to the first whose target exceeds the first's (Serve decided to add a replica), and
    `scale_up_s`, the same for running replicas (the new one serves). None: no rise, or no target."""
    def rise(column: int) -> float | None:
        if not counts or counts[0][column] is None:
            return None
        t0, start = counts[0][0], counts[0][column]
        return next((round(row[0] - t0, 1) for row in counts if (row[column] or 0) > start), None)

    return {"scale_up_decided_s": rise(2), "scale_up_s": rise(1)}


def replica_counts(timeline: Timeline, deployment: str) -> list[tuple[float, int, int | None]]:
    """(seconds, running replicas, target replicas) of `deployment` from the "app" samples of `load_and_watch`."""
    deployments = [(t, app.deployment(deployment)) for t, app in timeline.series("app")]
    return [(t, len(d.running), d.target_replicas) for t, d in deployments]


def load_and_watch(app: AppHandle, *, concurrency: int, seconds: float,
                   max_tokens: int = 32, input_tokens: int = 16, every_s: float = 1.0,
                   on_sample: Callable[[Timeline[BenchRun]], None] | None = None,
                   ) -> tuple[dict[str, Any], Timeline[BenchRun]]:
    """`concurrency` users streaming completions to `app` for `seconds` while Serve's status of the app is
    sampled (`AppStatus` records under "app"). Returns the load's summary (TTFT percentiles included)
    with the autoscaling policy in force and `scale_up_times` of the deployment that holds the model (the
    one autoscaling scales), and the timeline."""
    # Bounded by count as well as duration: more requests than the users could finish in `seconds`.
    # Streamed, so the run measures time to first token, what the llm policy scales on.
    workload = Workload(num_requests=max(concurrency, int(concurrency * seconds * 10)), input_tokens=input_tokens,
                        output_tokens=max_tokens, duration_s=seconds, timeout_s=max(app.request_timeout_s, seconds),
                        stream=True)
    timeline = run_observed(
        lambda: run_benchmark(app.base_url, workload, concurrency=concurrency, model=app.model, label="load",
                              progress=False, api_key=app.api_key),
        {"app": app.status},
        every_s=every_s, on_sample=on_sample,
    )
    auto = app.config.deployment.autoscaling
    summary = {**timeline.result.summary(), "policy": auto.policy if auto else None,  # type: ignore[union-attr]
               **scale_up_times(replica_counts(timeline, backend_for(app.config).model_deployment(app.config)))}
    return summary, timeline


def scale_up_run(cluster: Cluster, config, *, concurrency: int = 24, seconds: float = 60.0, max_tokens: int = 64,
                 progress=None) -> dict[str, Any]:
    """Deploy `config`, run `load_and_watch` on it, and delete the app. The report is the load's summary
    with `scale_up_decided_s`, `scale_up_s`, `max_running` and `timeline` (rows of t_s, target, running)."""
    app = cluster.deploy(config, progress=progress)
    try:
        summary, timeline = load_and_watch(app, concurrency=concurrency, seconds=seconds, max_tokens=max_tokens,
                                           input_tokens=30)
    finally:
        app.shutdown()
    counts = replica_counts(timeline, backend_for(config).model_deployment(config))
    rows = [{"t_s": t, "running": running, "target": target} for t, running, target in counts]
    return {**summary, "max_running": max((r["running"] for r in rows), default=0), "timeline": rows}


def policy_comparison(runs: dict[str, dict[str, Any]]):
    """One row per policy from `load_and_watch` summaries on the same load (`ServeTuner.last_load`,
    `scale_up_run`): seconds until Serve decided to add a replica and until it ran, TTFT percentiles,
    useful tokens/s and the request outcome."""
    import pandas as pd

    return pd.DataFrame([{"policy": policy, **{k: run.get(k) for k in POLICY_COLUMNS}}
                         for policy, run in runs.items()]).set_index("policy")
