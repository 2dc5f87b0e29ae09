"""Load patterns: a closed loop (concurrent users), an open loop (Poisson or gamma arrivals), sweeps and soaks."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Any, Iterable

from llmserve_nb.bench.arrivals import Arrival, arrival_times
from llmserve_nb.bench.client import discover_model, make_client, send_one
from llmserve_nb.bench.results import BenchReport, BenchRun, RequestResult
from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.workload import Workload


async def _arun(url, wl: Workload, items: list[tuple[str, int, int]], concurrency: int | None,
                schedule: list[float] | None, model, level: str, label, progress, tokenizer, api_key,
                **run_fields) -> BenchRun:
    """Closed loop with `concurrency` users, or open loop sending request i at `schedule[i]` s from the start."""
    from tqdm.auto import tqdm

    if model is None:
        model = await discover_model(url, api_key)
    drops = wl.drops()
    results: list[RequestResult] = []
    bar = tqdm(total=len(items), desc=f"{label} {level}", disable=not progress, leave=True)
    errors = 0

    async with make_client(url, wl, concurrency or 1024, api_key) as client:
        t_run = time.perf_counter()
        deadline = t_run + wl.duration_s

        async def launch(i: int) -> None:
            nonlocal errors
            rr = RequestResult(index=i, drop_after_chunks=drops[i])
            results.append(rr)
            await send_one(client, wl, model, items[i], rr, t_run, tokenizer)
            errors += rr.status == "error"
            bar.update(1)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)

        if concurrency is not None:
            todo = iter(range(len(items)))

            async def user() -> None:
                for i in todo:
                    if time.perf_counter() >= deadline:
                        return
                    await launch(i)

            tasks = [asyncio.create_task(user()) for _ in range(min(concurrency, len(items)))]
        else:
            tasks = []
            for i, offset in enumerate(schedule):
                t_next = t_run + offset
                if t_next >= deadline:
                    break
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
                tasks.append(asyncio.create_task(launch(i)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        t_end = time.perf_counter()
    bar.close()
    for rr in results:
        if rr.status == "pending":  # cancelled before its first await returned
            rr.status = "incomplete"
    results.sort(key=lambda r: r.index)
    # Wall duration: first send to the last request's end (or to the cut-off when the duration ended the run).
    return BenchRun(label, url, model, wl, concurrency, duration_s=t_end - t_run, results=results, **run_fields)


def _run_sync(coro):
    """asyncio.run, also from inside Jupyter (whose loop is already running in this thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_benchmark(
    url: str,
    workload: Workload | None = None,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    model: str | None = None,
    label: str = "run",
    progress: bool = True,
    tokenizer: Any = None,
    arrival_seed: int = 0,
    api_key: str | None = None,
    slo: SLO | None = None,
    arrival: Arrival = "poisson",
    burstiness: float = 1.0,
) -> BenchRun:
    """One bounded run against `url` (scheme://host:port, no /v1).

    Closed loop with `concurrency` users, or open loop at `rate` req/s with `arrival` "poisson" or
    "gamma" gaps (`burstiness`: see `arrivals.arrival_times`), seeded by `arrival_seed`. `slo` is kept
    on the run, whose summary then reports goodput. `model` defaults to the first id of GET /v1/models;
    `tokenizer` (a Hugging Face tokenizer) counts output tokens when the server returns no usage;
    `api_key` is sent as `Authorization: Bearer`.
    """
    wl = workload or Workload()
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop, req/s)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None:
        schedule = arrival_times(wl.num_requests, rate, arrival, burstiness, seed=arrival_seed)
        level = f"rate={rate:g}/s" + (f" {arrival}({burstiness:g})" if arrival != "poisson" else "")
        fields: dict[str, Any] = dict(rate=rate, arrival=arrival, burstiness=burstiness)
    else:
        schedule, level, fields = None, f"c={concurrency}", dict(rate=None)
    return _run_sync(_arun(url, wl, wl.items(), concurrency, schedule, model, level, label, progress, tokenizer,
                           api_key, slo=slo, **fields))


def sweep(
    url: str,
    workload: Workload | None = None,
    *,
    concurrency: Iterable[int] | None = (1, 8, 32),
    rates: Iterable[float] | None = None,
    model: str | None = None,
    label: str = "run",
    warmup: int = 1,
    progress: bool = True,
    tokenizer: Any = None,
    api_key: str | None = None,
    slo: SLO | None = None,
    arrival: Arrival = "poisson",
    burstiness: float = 1.0,
    arrival_seed: int = 0,
) -> BenchReport:
    """Run the workload once per concurrency level, or per rate (open loop) if `rates` is given.

    `warmup` requests are sent one at a time first and discarded, so that one-off costs (first
    forward pass, connection set-up) do not land in the first level. `slo`, `arrival`, `burstiness`
    and `arrival_seed` are passed to every `run_benchmark` (the arrival ones apply to rates only).
    """
    wl = workload or Workload()
    rates = list(rates) if rates is not None else None
    for r in rates or ():  # bad arguments fail before any request is sent
        arrival_times(0, r, arrival, burstiness)
    if model is None:
        model = _run_sync(discover_model(url, api_key))
    common = dict(model=model, label=label, tokenizer=tokenizer, api_key=api_key, slo=slo)
    if warmup:
        warm = dataclasses.replace(wl, num_requests=warmup, seed=wl.seed + 1, drop_fraction=0.0)
        run_benchmark(url, warm, concurrency=1, progress=False, **common)
    if rates is not None:
        runs = [run_benchmark(url, wl, rate=r, progress=progress, arrival=arrival, burstiness=burstiness,
                              arrival_seed=arrival_seed, **common) for r in rates]
    else:
        runs = [run_benchmark(url, wl, concurrency=c, progress=progress, **common) for c in concurrency or ()]
    return BenchReport(runs)


def soak(
    url: str,
    workload: Workload,
    *,
    duration_s: float,
    concurrency: int = 32,
    model: str | None = None,
    label: str = "soak",
    progress: bool = True,
    api_key: str | None = None,
    slo: SLO | None = None,
) -> BenchRun:
    """A long closed-loop run: `concurrency` users for `duration_s`, then read `BenchRun.windows()`.

    It stops at `duration_s` or after `workload.num_requests` requests, whichever comes first, so
    size `num_requests` above what the server can finish in that time.
    """
    wl = dataclasses.replace(workload, duration_s=duration_s)
    return run_benchmark(url, wl, concurrency=concurrency, model=model, label=label, progress=progress,
                         api_key=api_key, slo=slo)
