"""Settings side by side on one embedded Ray: the shipped defaults against alternatives, interleaved
(A B A B ...) so that drift on a shared machine falls on all of them.

A variant is a name and `AppConfig` overrides by dotted path. Each round deploys every variant in turn on the
same app: a live setting (`batching.*`) is an in-place `user_config` update, anything else restarts the
replica (the model reloads; the deploy waits for it). Two workloads, the same at every round: fixed
(`--input-tokens` in, `--max-tokens` out, ignore_eos) and mixed (log-uniform output lengths, EOS honoured),
closed loop at each level with max(`--min-requests`, 2 x level) requests.

    .venv/bin/python benchmarks/settings_ab.py [--variants 'default;batch32:batching.max_batch_size=32'] \
        [--levels 32,8] [--rounds 2]

`--variants`: `;`-separated `name[:path=value,path=value]`, values read as JSON where they parse (`1`, `0.0`,
`null`) and as strings where not; the first variant is the baseline of the ratios. Each row also says how
many cores the replica(s) and all processes (the load generator's included) kept busy while it ran.
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd
from bench_common import (add_mixed_args, add_workload_args, cpu_by_process, cpu_info, fixed_workload, level_workload,
                          levels_of, log, mixed_workload)

from llmserve_nb import AppConfig, bench, connect


def parse_variants(spec: str) -> dict[str, dict]:
    variants = {}
    for item in filter(None, (v.strip() for v in spec.split(";"))):
        name, _, sets = item.partition(":")
        overrides = {}
        for assignment in filter(None, (a.strip() for a in sets.split(","))):
            path, _, raw = assignment.partition("=")
            try:
                overrides[path] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[path] = raw
        variants[name] = overrides
    return variants


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=240.0)
    add_mixed_args(p)
    p.add_argument("--variants", default="default;batch32:batching.max_batch_size=32",
                   help="`;`-separated name[:path=value,...]; the first is the baseline")
    p.add_argument("--workloads", default="fixed,mixed")
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(levels="32,8", min_requests=8)
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    baseline = next(iter(variants))
    levels = levels_of(args)
    base = AppConfig()
    workloads = {"fixed": fixed_workload(args), "mixed": mixed_workload(args)}
    workloads = {k: workloads[k] for k in args.workloads.split(",")}
    cluster = connect(target="local")
    rows = []
    try:
        for rnd in range(1, args.rounds + 1):
            for name, overrides in variants.items():
                app = cluster.deploy(base.with_overrides(**overrides), progress=None)
                threads = app.stats()["engine"]["torch_threads"]
                for kind, wl in workloads.items():
                    for c in levels:
                        level = level_workload(wl, c, args.min_requests if kind == "fixed" else args.mixed_min_requests,
                                               per_user=2)
                        log(f"round {rnd}, {name} ({threads} torch threads), {kind}, c={c}, "
                            f"{level.num_requests} requests")
                        with cpu_by_process() as cores:
                            run = bench.run_benchmark(app.base_url, level,
                                                      concurrency=c, model=app.model, api_key=app.api_key,
                                                      progress=False)
                        s = run.summary()
                        rows.append({"round": rnd, "variant": name, "threads": threads, "workload": kind,
                                     "concurrency": c, "completed": s["completed"],
                                     "errors": s["errors"] + s["incomplete"],
                                     "output_tok_per_s": s["output_tok_per_s"], "ttft_ms_p50": s["ttft_ms_p50"],
                                     "tpot_ms_p50": s["tpot_ms_p50"], "replica_cores": cores.get("replica", 0.0),
                                     "all_cores": round(sum(cores.values()), 2)})
    finally:
        cluster.shutdown()
    df = pd.DataFrame(rows)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; rounds interleaved")
    for name, overrides in variants.items():
        print(f"  {name}: {overrides or 'AppConfig() as shipped'}")
    print()
    print(df.round(1).to_string(index=False))
    keys = ["workload", "concurrency", "variant"]
    mean = df.groupby(keys, sort=False)[["output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50"]].mean()
    ratio = mean.div(mean.xs(baseline, level="variant"), axis=0).rename(columns=lambda c: f"{c} / {baseline}")
    print(f"\nMeans over rounds, and ratios to {baseline}\n")
    print(pd.concat([mean, ratio], axis=1).round(3).reset_index().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
