"""The load of `AppHandle.burst`, the same for every backend: `n` completions sent at once.

Each backend's `burst` wraps it with its own view of the batch the engine formed for them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from llmserve_nb.bench import BenchRun

__all__ = ["burst_figures", "burst_load"]


def burst_load(app: Any, n: int, max_tokens: int, input_tokens: int) -> Callable[[], BenchRun]:
    """`llmserve_nb.bench`'s closed loop with `n` users and `n` non-streaming requests to `app`."""
    from llmserve_nb.bench import Workload, run_benchmark

    workload = Workload(num_requests=n, input_tokens=input_tokens, output_tokens=max_tokens, stream=False,
                        duration_s=app.request_timeout_s, timeout_s=app.request_timeout_s)
    return lambda: run_benchmark(app.base_url, workload, concurrency=n, model=app.model, label=f"burst {app.name}",
                                 progress=False, api_key=app.api_key)


def burst_figures(run: BenchRun, n: int) -> dict[str, Any]:
    summary = run.summary()
    latencies = sorted(r.e2e_s for r in run.results) or [math.nan]
    return {
        "requests": n,
        "wall_s": round(run.duration_s, 3),
        "output_tok_per_s": round(summary["output_tok_per_s"], 1),
        "latency_p50_s": round(summary["e2e_ms_p50"] / 1000, 3),
        "latency_max_s": round(latencies[-1], 3),
    }
