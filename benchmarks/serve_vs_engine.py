"""What the Serve app costs and gains over calling the engine directly, measured side by side.

Generated tok/s at concurrency 1, 8, 32 through the Serve app (max_batch_size 32), against the same
engine in-process on static batches of 1, 8, 32 (the limit: no HTTP, no queueing), and against the
app with batching off (max_batch_size 1). Fixed output length (ignore_eos), ~30-token prompts.

    python benchmarks/serve_vs_engine.py [--levels 1,8,32] [--min-requests 4] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import gc
import sys

import pandas as pd

from bench_common import add_workload_args, engine_limit, levels_of, load_offline_engine, log, sweep_deployed
from llmserve_nb import bench
from llmserve_nb.cluster import connect
from llmserve_nb.config import AppConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=90.0)
    args = p.parse_args(argv)
    levels = levels_of(args)
    wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens, duration_s=args.level_duration,
                        timeout_s=args.timeout)

    engine = load_offline_engine()
    rows = engine_limit(engine, levels, wl, args.min_requests, "engine")
    del engine
    gc.collect()  # the replica loads its own copy; two on 2 cores would only compete for memory
    cluster = connect()
    try:
        base = AppConfig()
        rows += sweep_deployed(cluster, base.with_overrides(**{"batching.max_batch_size": max(levels)}), wl, levels,
                               args.min_requests, "serve")
        rows += sweep_deployed(cluster, base.with_overrides(**{"batching.max_batch_size": 1}), wl, levels,
                               args.min_requests, "serve, batching off")
    finally:
        cluster.shutdown()

    tps = pd.DataFrame(rows).pivot_table(index="concurrency", columns="label", values="output_tok_per_s")
    table = pd.DataFrame({
        "concurrency / batch": tps.index,
        "engine tok/s": tps["engine"].values,
        "serve tok/s": tps["serve"].values,
        "serve, batching off tok/s": tps["serve, batching off"].values,
        "serve ÷ engine": (tps["serve"] / tps["engine"]).values,
        "batching off ÷ engine": (tps["serve, batching off"] / tps["engine"]).values,
        "serve ÷ batching off": (tps["serve"] / tps["serve, batching off"]).values,
    })
    log("done")
    print(bench.to_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
