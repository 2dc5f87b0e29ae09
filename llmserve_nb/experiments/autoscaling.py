"""Autoscaling policies compared on the same load: how soon Serve decided to add a replica, how soon it
ran, and what users saw meanwhile (`notebooks/02_tune_autoscaling.ipynb`,
`benchmarks/autoscaling_policies.py`). The policy itself is `llmserve_nb.server.autoscaling_policy`."""
from __future__ import annotations

from typing import Any

__all__ = ["POLICY_COLUMNS", "policy_comparison", "scale_up_run"]


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
