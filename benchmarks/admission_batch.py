"""The admission batch (`batching.max_batch_size`) side by side on one deployed app: the default against
the alternatives, interleaved (A B A B ...) so that drift on a shared machine falls on both.

Every switch is an in-place `user_config` update (no replica restart, no model reload), so the rows differ
in the admission batch alone. Two workloads, the same at every round: fixed (`--input-tokens` in,
`--max-tokens` out, ignore_eos) and mixed (log-uniform output lengths, EOS honoured), closed loop at each
level with max(`--min-requests`, 2 x level) requests.

    .venv/bin/python benchmarks/admission_batch.py [--sizes 8,32] [--levels 32,8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import pandas as pd
from bench_common import add_mixed_args, add_workload_args, cpu_info, levels_of, log, mixed_workload

from llmserve_nb import AppConfig, bench, connect


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=240.0)
    add_mixed_args(p)
    p.add_argument("--sizes", default=f"{AppConfig().batching.max_batch_size},32",
                   help="admission batch sizes; the first is the baseline (default: the shipped default, 32)")
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(levels="32,8", min_requests=8)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = levels_of(args)
    base = AppConfig()
    fixed = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens,
                           duration_s=args.level_duration, timeout_s=args.timeout)
    mixed = mixed_workload(args)
    cluster = connect(target="local")
    rows = []
    try:
        app = cluster.deploy(base)
        for rnd in range(1, args.rounds + 1):
            for size in sizes:
                app = cluster.deploy(base.with_overrides(**{"batching.max_batch_size": size}))
                for kind, wl in (("fixed", fixed), ("mixed", mixed)):
                    for c in levels:
                        n = max(args.min_requests if kind == "fixed" else args.mixed_min_requests, 2 * c)
                        log(f"round {rnd}, admission batch {size}, {kind}, c={c}, {n} requests")
                        run = bench.run_benchmark(app.base_url, dataclasses.replace(wl, num_requests=n),
                                                  concurrency=c, model=app.model, api_key=app.api_key,
                                                  progress=False)
                        s = run.summary()
                        rows.append({"round": rnd, "batch": size, "workload": kind, "concurrency": c,
                                     "completed": s["completed"], "errors": s["errors"] + s["incomplete"],
                                     "output_tok_per_s": s["output_tok_per_s"], "ttft_ms_p50": s["ttft_ms_p50"],
                                     "tpot_ms_p50": s["tpot_ms_p50"]})
    finally:
        cluster.shutdown()
    df = pd.DataFrame(rows)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; rounds interleaved\n")
    print(df.round(1).to_string(index=False))
    mean = df.groupby(["workload", "concurrency", "batch"])[["output_tok_per_s", "ttft_ms_p50"]].mean()
    ratio = mean.div(mean.xs(sizes[0], level="batch"), axis=0).rename(columns=lambda c: f"{c} / batch {sizes[0]}")
    print(f"\nMeans over rounds, and ratios to admission batch {sizes[0]}\n")
    print(pd.concat([mean, ratio], axis=1).round(3).reset_index().to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
