"""Prefix caching on and off, at the engine level in process (no HTTP, no Ray).

A prefix-repetition workload (vLLM's `prefix_repetition`: `--prefix` shared tokens from `--num-prefixes`
prompts, then `--unique` tokens of each request's own, `--output` tokens generated, ignore_eos) runs
closed loop at each concurrency through `TransformersEngine` (the served engine: scheduler thread,
continuous batching, streaming), with `engine.prefix_caching` off and then on (a cache of `--budget-mb`),
each a freshly loaded engine. Each run starts with one untimed request per
prefix, so "on" is the steady state of a system prompt that keeps coming back. TTFT is submit to first
streamed text; tok/s is generated tokens / wall time of the level.

With `--served`, the same workload also goes through the Serve app (a fresh local Ray head; the app
deployed with `engine.prefix_caching` false, then true, with its defaults otherwise) with the load
generator `llmserve_nb.bench`, over HTTP. Run that under the team's Ray lock.

    python benchmarks/prefix_caching.py [--levels 1,8] [--requests 16] [--prefix 512] [--unique 64] [--output 64]
        [--served | --served-only]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import pandas as pd

from bench_common import cpu_info, deploy_on, log, ray_head
from llmserve_nb import bench
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest, TransformersEngine
from llmserve_nb.stats import percentile


async def closed_loop(served: TransformersEngine, prompts: list[str], output: int, concurrency: int) -> dict:
    """Keep `concurrency` requests in flight until every prompt is served; per-request TTFT and tokens."""
    queue = list(prompts)
    ttfts: list[float] = []
    tokens = 0

    async def user() -> None:
        nonlocal tokens
        while queue:
            req = GenerationRequest(prompt=queue.pop(0), max_tokens=output, ignore_eos=True)
            prepared = await served.prepare(req)
            t0 = time.perf_counter()
            (stream,) = served.submit([prepared])
            first = None
            async for _ in stream:
                first = first or time.perf_counter()
            ttfts.append(first - t0)
            tokens += stream.result.completion_tokens

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(user() for _ in range(concurrency))), timeout=1800)
    wall = time.perf_counter() - t0
    return {"requests": len(ttfts), "ttft_ms_p50": 1000 * percentile(ttfts, 50),
            "ttft_ms_p99": 1000 * percentile(ttfts, 99), "output_tok_per_s": tokens / wall, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8", help="closed-loop concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="timed requests per level: max(this, 2 x level)")
    p.add_argument("--prefix", type=int, default=512, help="shared prefix tokens")
    p.add_argument("--num-prefixes", type=int, default=1)
    p.add_argument("--unique", type=int, default=64, help="each request's own tokens after the prefix")
    p.add_argument("--output", type=int, default=64, help="tokens generated per request")
    p.add_argument("--budget-mb", type=float, default=256.0, help="prefix cache budget for 'on'")
    p.add_argument("--served", action="store_true", help="also through the Serve app over HTTP (needs Ray)")
    p.add_argument("--served-only", action="store_true", help="only through the Serve app (hold a Ray lock briefly)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; {args.prefix} shared + {args.unique} "
          f"unique tokens ({args.num_prefixes} prefix(es)), {args.output} out, ignore_eos")
    if not args.served_only:
        print("\nEngine in process (no HTTP, no Ray):\n")
        print(bench.to_markdown(with_ratios(engine_rows(args, levels)), digits=2))
    if args.served or args.served_only:
        print("\nThe Serve app over HTTP (llmserve_nb.bench):\n")
        print(bench.to_markdown(with_ratios(served_rows(args, levels)), digits=2))
    return 0


def workload(args, level: int) -> tuple[bench.Workload, list[str], list[str]]:
    """The level's workload: one untimed prompt per prefix (to fill the cache), then the timed ones."""
    n = max(args.requests, 2 * level)
    wl = bench.Workload(num_requests=n + args.num_prefixes, input_tokens=args.unique, output_tokens=args.output,
                        shared_prefix_tokens=args.prefix, num_prefixes=args.num_prefixes, seed=level)
    items = wl.items()
    # --prefix 0: no prompt shares anything, what caching costs when it cannot help.
    warm = {pid: prompt for (prompt, _, _), pid in zip(items, wl.prefix_ids() or [])}
    timed = [prompt for prompt, _, _ in items if prompt not in warm.values()][:n]
    return wl, list(warm.values()), timed


@dataclasses.dataclass
class Given(bench.Workload):
    """A workload of given prompts: the served table sends exactly the engine table's timed prompts."""

    given: tuple[str, ...] = ()

    def prompts(self, lengths):
        return list(self.given)


def with_ratios(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    for _, group in table.groupby("concurrency"):
        off, on = (group[group.caching == c].iloc[0] for c in ("off", "on"))
        at = group.index[group.caching == "on"]
        table.loc[at, "ttft_p50 on÷off"] = on.ttft_ms_p50 / off.ttft_ms_p50
        table.loc[at, "tok/s on÷off"] = on.output_tok_per_s / off.output_tok_per_s
    return table


def cache_columns(cache: dict) -> dict:
    return {"hit_rate": cache.get("hit_rate", 0.0), "cache_MiB": cache.get("bytes", 0) / 2**20,
            "budget_MiB": cache.get("budget_bytes", 0) / 2**20, "evictions": cache.get("evictions", 0)}


def engine_rows(args, levels: list[int]) -> list[dict]:
    rows = []
    for level in levels:
        _, warm, timed = workload(args, level)
        for label in ("off", "on"):
            # A fresh engine per run, loaded on its decode loop's thread as in a replica (one OpenMP pool).
            served = TransformersEngine(EngineConfig(prefix_caching=label == "on", prefix_cache_mb=args.budget_mb))
            try:
                log(f"c={level} caching {label}: {len(warm)} untimed + {len(timed)} timed requests")
                asyncio.run(closed_loop(served, warm, args.output, 1))
                result = asyncio.run(closed_loop(served, timed, args.output, level))
                cache = served.stats()["prefix_cache"]
                prompt_tokens = len(served.model.prompt_ids(GenerationRequest(prompt=timed[0])))
            finally:
                served.close()
            rows.append({"caching": label, "concurrency": level, **result, "prompt_tokens": prompt_tokens,
                         **cache_columns(cache)})
    return rows


def served_rows(args, levels: list[int]) -> list[dict]:
    import httpx

    rows = []
    with ray_head("prefix-caching") as head:
        for label in ("off", "on"):
            # A change of engine settings replaces the replica: each side starts from a cold model and cache.
            app = deploy_on(head, {"engine.prefix_caching": label == "on",
                                   "engine.prefix_cache_mb": args.budget_mb, "deployment.num_replicas": 1})
            headers = {"Authorization": f"Bearer {app['api_key']}"} if app["api_key"] else {}
            for level in levels:
                wl, warm, timed = workload(args, level)
                log(f"served, c={level} caching {label}: {len(warm)} untimed + {len(timed)} timed requests")
                for prompt in warm:
                    body = wl.body(prompt, args.output, app["model"]) | {"stream": False}
                    httpx.post(app["base_url"] + "/v1/completions", json=body, headers=headers,
                               timeout=300).raise_for_status()
                timed_wl = Given(**{**dataclasses.asdict(wl), "num_requests": len(timed)}, given=tuple(timed))
                run = bench.run_benchmark(app["base_url"], timed_wl, concurrency=level, model=app["model"],
                                          label=f"{label} c={level}", progress=False, api_key=app["api_key"])
                summary = run.summary()
                stats = httpx.get(app["base_url"] + "/stats", headers=headers, timeout=30).json()
                rows.append({"caching": label, "concurrency": level, "requests": summary["completed"],
                             "errors": summary["errors"], "ttft_ms_p50": summary["ttft_ms_p50"],
                             "ttft_ms_p99": summary["ttft_ms_p99"], "output_tok_per_s": summary["output_tok_per_s"],
                             **cache_columns(stats.get("prefix_cache", {}))})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
