"""Overload seen from the client: one request (`probe`), a burst sent at one instant (`burst`), and the
backpressure check that compares a burst with what the app runs at once (`backpressure_check`), against
the small-queue app the reliability experiments overload (`small_queue_config`). Only the app's URL is
needed; every request has a timeout."""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx

from llmserve_nb.bench.client import headers
from llmserve_nb.bench.runner import _run_sync
from llmserve_nb.stats import percentile

__all__ = ["BACKPRESSURE_STATUSES", "backpressure_check", "burst", "probe", "small_queue_config"]

# What Serve answers when a request is refused for backpressure (deployment.backpressure_status_code).
BACKPRESSURE_STATUSES = (503, 429)


def probe(base_url: str, path: str = "/v1/completions", body: dict[str, Any] | None = None, *,
          api_key: str | None = None, method: str = "POST", timeout_s: float = 60.0) -> dict[str, Any]:
    """One request: its status, the error message (when the body is an OpenAI error) and Retry-After."""
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(timeout_s, connect=5.0)) as c:
        r = c.request(method, base_url.rstrip("/") + path, json=body, headers=headers(api_key))
    try:
        message = r.json().get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    return {"status": r.status_code, "message": message or ("" if r.status_code < 400 else r.text[:300]),
            "retry_after": r.headers.get("retry-after")}


async def _burst(base_url: str, n: int, api_key: str | None, max_tokens: int, timeout_s: float,
                 prompt: str) -> list[dict[str, Any]]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers(api_key), trust_env=False,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> dict[str, Any]:
            await start.wait()
            t0 = time.perf_counter()
            row: dict[str, Any] = {"index": i, "status": None, "retry_after": None, "error": ""}
            try:
                r = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout_s)
                row["status"] = r.status_code
                row["retry_after"] = r.headers.get("retry-after")
                if r.status_code >= 400:
                    row["error"] = r.text[:300]
                else:
                    row["completion_tokens"] = r.json()["usage"]["completion_tokens"]
            except (httpx.TimeoutException, asyncio.TimeoutError):
                row["error"] = f"no answer within {timeout_s:g} s"
            except httpx.HTTPError as e:
                row["error"] = f"{type(e).__name__}: {e}"
            row["latency_s"] = time.perf_counter() - t0
            return row

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # every task is waiting on the event: release them together
        start.set()
        return list(await asyncio.gather(*tasks))


def burst(base_url: str, n: int = 20, *, api_key: str | None = None, max_tokens: int = 32,
          timeout_s: float = 120.0, prompt: str = "Story: the ship sailed") -> dict[str, Any]:
    """`n` completions sent at the same instant. Returns per-request rows and a summary: how many were
    accepted (200), refused for backpressure (503/429, with Retry-After?), failed otherwise or unanswered,
    and the latencies of each group."""
    rows = _run_sync(_burst(base_url, n, api_key, max_tokens, timeout_s, prompt))
    ok = [r for r in rows if r["status"] == 200]
    refused = [r for r in rows if r["status"] in BACKPRESSURE_STATUSES]
    other = [r for r in rows if r not in ok and r not in refused]

    def pct(rs: list[dict], q: float) -> float:
        return percentile([r["latency_s"] for r in rs], q)

    return {
        "requests": n,
        "accepted": len(ok),
        "refused": len(refused),
        "refused_statuses": sorted({r["status"] for r in refused}),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "retry_after": sorted({r["retry_after"] for r in refused if r["retry_after"] is not None}),
        "other_failures": len(other),
        "other_examples": [f"{r['status']}: {r['error'][:200]}" for r in other[:3]],
        "accepted_p50_s": pct(ok, 50),
        "accepted_p99_s": pct(ok, 99),
        "accepted_max_s": max((r["latency_s"] for r in ok), default=math.nan),
        "refused_p99_s": pct(refused, 99),
        "refused_max_s": max((r["latency_s"] for r in refused), default=math.nan),
        "refusal_example": refused[0]["error"][:200] if refused else "",
        "rows": rows,
    }


def backpressure_check(base_url: str, n: int = 20, *, slots: int, api_key: str | None = None,
                       max_tokens: int = 16, settle_s: float = 3.0) -> dict[str, Any]:
    """A burst of `n` against the app, then one wave of what it runs at once (`slots` = replicas x
    max_ongoing_requests, at most what the burst got accepted) alone, as the yardstick: the accepted
    requests of the burst should take no longer than the `waves` they need (the queued ones wait for a
    running one to end) times that wave. Returns {"burst", "alone", "waves", "table"}."""
    import pandas as pd

    over = burst(base_url, n, api_key=api_key, max_tokens=max_tokens)
    # Serve's router caches the replicas' queue lengths for a moment, so right after a burst it may
    # refuse again: let it settle.
    time.sleep(settle_s)
    alone = burst(base_url, max(1, min(over["accepted"], slots)), api_key=api_key, max_tokens=max_tokens)
    columns = ["requests", "accepted", "refused", "refused_statuses", "refused_with_retry_after", "retry_after",
               "refused_max_s", "accepted_p50_s", "accepted_p99_s"]
    table = pd.DataFrame([{**{k: r[k] for k in columns}, "run": name}
                          for name, r in (("burst", over), ("one wave alone", alone))]).set_index("run")
    return {"burst": over, "alone": alone, "waves": math.ceil(over["accepted"] / slots), "table": table}


def small_queue_config(name: str = "reliability", *, api_key: str | None = None, num_cpus: float = 1.0,
                       torch_threads: int | None = None):
    """The app the reliability experiments overload: two replicas that each run 2 requests and queue 2
    more in Serve (a burst of 20 overflows it), answering overload with 503 + Retry-After 3, health
    checked every 2 s, draining for up to 30 s on shutdown. `api_key` is enforced by the replicas."""
    from llmserve_nb.config import API_KEY_ENV, AppConfig

    runtime_env = {"env_vars": {API_KEY_ENV: api_key}} if api_key else {}
    overrides: dict[str, Any] = {
        "engine.max_num_seqs": 8,
        "batching.max_batch_size": 2,
        "batching.batch_wait_timeout_s": 0.02,
        "deployment.num_replicas": 2,
        "deployment.num_cpus": num_cpus,
        "deployment.max_ongoing_requests": 2,
        "deployment.max_queued_requests": 2,
        "deployment.retry_after_s": 3,
        "deployment.health_check_period_s": 2.0,
        "deployment.health_check_timeout_s": 20.0,
        "deployment.graceful_shutdown_wait_loop_s": 0.5,
        "deployment.graceful_shutdown_timeout_s": 30.0,
    }
    if torch_threads is not None:
        overrides["engine.torch_threads"] = torch_threads
    return AppConfig(name=name, route_prefix=f"/{name}", runtime_env=runtime_env).with_overrides(**overrides)
