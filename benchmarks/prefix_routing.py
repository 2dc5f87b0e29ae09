"""Cache-aware routing across 2 replicas: Serve's default router against the prefix router, prefix caching on.

A prefix-repetition workload (`--num-prefixes` shared prefixes of `--prefix` tokens, each request one of them
then `--unique` tokens of its own, `--output` tokens generated, ignore_eos) runs closed loop at
`--concurrency` against the transformers app with 2 replicas (1 CPU and 1 torch thread each, on a fresh
local Ray head of 2 CPUs), once per router and prefix-cache budget (`--budgets`, MiB per replica):

- `power_of_two`: Serve's default router; every replica sees every prefix.
- `prefix_affinity`: Ray's PrefixCacheAffinityRouter behind the app's LLMIngress (`server/router.py`): each
  prefix stays on the replica that first served it. It pays one more handle hop per request.

Routing can only matter when the prefixes do not all fit in one replica's cache: with a budget that holds
them all, both routers hit after the first request per prefix and replica (that row shows the ingress's
cost); with a budget near half the prefixes (52 MiB: two 512-token prefixes of 22.5 MiB and a few
requests' own tokens), the default router makes both replicas cache every prefix and evict each other's,
while the prefix router splits them. Each run starts with `--warm` x `--num-prefixes` untimed requests of
the same workload through the same router (the steady state of prompts that keep coming back); the hit rate is
the replicas' own prefix-cache counters (GET /stats) over the timed requests. `small_request_ms_p50` is
the p50 of one-token completions of a 2-token prompt sent one at a time before the load: the per-request
cost of the ingress hop. Every deploy is fresh (deleted in between): cold model and cache. Run it under
the team's Ray lock.

    python benchmarks/prefix_routing.py [--requests 32] [--concurrency 4] [--prefix 512] [--num-prefixes 4] \
        [--unique 64] [--output 64] [--budgets 52,256] [--warm 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import httpx
import pandas as pd

from bench_common import cpu_info, log, ray_head
from llmserve_nb import bench
from llmserve_nb.cluster import connect
from llmserve_nb.config import AppConfig
from llmserve_nb.stats import percentile

ROUTERS = ("power_of_two", "prefix_affinity")
KIB_PER_TOKEN = 45  # SmolLM2-135M fp32 KV (config.EngineConfig.prefix_cache_mb)


@dataclasses.dataclass
class Given(bench.Workload):
    """A workload of given prompts (the warm and the timed parts of one prefix workload)."""

    given: tuple[str, ...] = ()

    def prompts(self, lengths):
        return list(self.given)


def workload(args) -> tuple[bench.Workload, list[str], list[str]]:
    warm_n = args.warm * args.num_prefixes
    wl = bench.Workload(num_requests=warm_n + args.requests, input_tokens=args.unique, output_tokens=args.output,
                        shared_prefix_tokens=args.prefix, num_prefixes=args.num_prefixes, timeout_s=600.0,
                        duration_s=1800.0)
    prompts = [prompt for prompt, _, _ in wl.items()]
    return wl, prompts[:warm_n], prompts[warm_n:]


def replica_stats(base_url: str, tries: int = 40) -> dict[str, dict]:
    """Each replica's /stats, keyed by replica: GET /stats until both replicas have answered."""
    seen: dict[str, dict] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(tries):
            stats = client.get(base_url + "/stats").json()
            seen[stats["replica"]] = stats
            if len(seen) == 2:
                break
    return seen


def cache_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, float]:
    """Hit rate (prompt tokens found in the cache / prompt tokens looked up) over the timed run, both replicas."""
    def total(stats, key):
        return sum(s.get("prefix_cache", {}).get(key, 0) for s in stats.values())

    queried = total(after, "queried_tokens") - total(before, "queried_tokens")
    hits = total(after, "hit_tokens") - total(before, "hit_tokens")
    return {"hit_rate": hits / queried if queried else float("nan"),
            "evictions": total(after, "evictions") - total(before, "evictions")}


def small_request_ms(base_url: str, model: str, n: int = 30) -> float:
    """p50 of `n` one-token completions of a 2-token prompt, one at a time: the fixed cost of a request,
    where the ingress hop shows (the replica's work is a few ms)."""
    times = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            client.post("/v1/completions", json={"model": model, "prompt": "Hello there", "max_tokens": 1}
                        ).raise_for_status()
            times.append(time.perf_counter() - t0)
    return 1000 * percentile(times, 50)


def one(cluster, args, router: str, budget_mb: float) -> dict:
    cfg = AppConfig(name="routing", engine={"prefix_caching": True, "prefix_cache_mb": budget_mb, "torch_threads": 1},
                    deployment={"num_replicas": 2, "num_cpus": 1, "request_router": router})
    t0 = time.monotonic()
    app = cluster.deploy(cfg, ship_package=False, progress=None)
    log(f"{router}, {budget_mb:g} MiB: deployed in {time.monotonic() - t0:.0f} s")
    try:
        wl, warm, timed = workload(args)
        small_ms = small_request_ms(app.base_url, app.model)
        kw = dict(concurrency=args.concurrency, model=app.model, progress=False)
        fields = {**dataclasses.asdict(wl), "num_requests": len(warm)}
        bench.run_benchmark(app.base_url, Given(**{**fields, "given": tuple(warm)}), label="warm", **kw)
        before = replica_stats(app.base_url)
        fields["num_requests"] = len(timed)
        run = bench.run_benchmark(app.base_url, Given(**{**fields, "given": tuple(timed)}), label=router, **kw)
        after = replica_stats(app.base_url)
        s = run.summary()
        log(f"{router}, {budget_mb:g} MiB: {s['completed']} ok, {s['errors']} errors, "
            f"TTFT p50 {s['ttft_ms_p50']:.0f} ms, {s['output_tok_per_s']:.1f} tok/s")
        return {"budget_MiB": budget_mb, "router": router, "completed": s["completed"], "errors": s["errors"],
                "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"], "e2e_ms_p50": s["e2e_ms_p50"],
                "output_tok_per_s": s["output_tok_per_s"], **cache_delta(before, after),
                "small_request_ms_p50": small_ms}
    finally:
        app.shutdown()


def with_ratios(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    for budget, group in table.groupby("budget_MiB"):
        base, prefix = (group[group.router == r].iloc[0] for r in ROUTERS)
        at = group.index[group.router == "prefix_affinity"]
        table.loc[at, "ttft_p50 ÷ default"] = prefix.ttft_ms_p50 / base.ttft_ms_p50
        table.loc[at, "ttft_p99 ÷ default"] = prefix.ttft_ms_p99 / base.ttft_ms_p99
        table.loc[at, "tok/s ÷ default"] = prefix.output_tok_per_s / base.output_tok_per_s
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="timed requests per run")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop users")
    p.add_argument("--prefix", type=int, default=512, help="shared prefix tokens")
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--unique", type=int, default=64, help="each request's own tokens after the prefix")
    p.add_argument("--output", type=int, default=64, help="tokens generated per request")
    p.add_argument("--budgets", default="52,256", help="prefix-cache MiB per replica, one pair of runs each")
    p.add_argument("--warm", type=int, default=2, help="untimed requests per prefix before each timed run")
    args = p.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    cpu = cpu_info()
    working_set = args.num_prefixes * args.prefix * KIB_PER_TOKEN / 1024
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; 2 replicas x 1 CPU, 1 torch thread; "
          f"{args.num_prefixes} prefixes x {args.prefix} shared + {args.unique} unique tokens "
          f"(prefixes' KV {working_set:.0f} MiB), {args.output} out, ignore_eos; c={args.concurrency}, "
          f"{args.requests} timed requests after {args.warm} per prefix untimed")
    rows = []
    with ray_head("prefix-routing", num_cpus=2) as head:
        cluster = connect(address=head.dashboard_url, serve_url=head.serve_url, token=head.token)
        for budget in budgets:
            for router in ROUTERS:
                rows.append(one(cluster, args, router, budget))
    print()
    print(bench.to_markdown(with_ratios(rows), digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
