"""What the Serve app costs and gains over calling the engine directly, measured side by side.

Generated tok/s at concurrency 1, 8, 32 through the Serve app (max_batch_size = the top level), against
the same engine in-process on static batches of 1, 8, 32 (the limit: no HTTP, no queueing), each at
every torch thread count of `--torch-threads`: the engine offline with `torch.set_num_threads(t)`, the
app with `engine.torch_threads=t` and `deployment.num_cpus=t`, so both sides compute with the same
threads. The app with batching off (max_batch_size 1) runs at the first thread count. Fixed output
length (ignore_eos), ~30-token prompts. A second table has the cores each kind of process (the replica,
Serve's proxy and controller, Ray's own processes, this process: the load generator) used at each level.

The default thread counts are 1 (what a replica gets by default: its CPU allotment) and every core.
On a machine with few cores the second shows how much the serving processes (proxy, Ray, the load
generator) take from an engine that wants all of them.

    python benchmarks/serve_vs_engine.py [--levels 1,8,32] [--min-requests 4] [--max-tokens 64] [--torch-threads 1,2]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import pandas as pd

from bench_common import add_workload_args, engine_limit, levels_of, load_offline_engine, log, sweep_deployed
from llmserve_nb import bench
from llmserve_nb.cluster import connect
from llmserve_nb.config import AppConfig


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=90.0)
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--torch-threads", default=",".join(dict.fromkeys(["1", str(cores)])),
                   help="comma list of torch thread counts, each for both the engine offline and the app")
    args = p.parse_args(argv)
    levels = levels_of(args)
    threads = [int(t) for t in args.torch_threads.split(",") if t.strip()]
    wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens, duration_s=args.level_duration,
                        timeout_s=args.timeout)

    engine = load_offline_engine()
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        rows += [{**r, "threads": t} for r in engine_limit(engine, levels, wl, args.min_requests, "engine")]
    del engine
    gc.collect()  # the replica loads its own copy; two on 2 cores would only compete for memory
    cluster = connect()
    try:
        base = AppConfig().with_overrides(**{"batching.max_batch_size": max(levels)})
        for t in threads:
            cfg = base.with_overrides(**{"engine.torch_threads": t, "deployment.num_cpus": t})
            rows += [{**r, "threads": t} for r in sweep_deployed(cluster, cfg, wl, levels, args.min_requests, "serve")]
        off = base.with_overrides(**{"batching.max_batch_size": 1, "engine.torch_threads": threads[0],
                                     "deployment.num_cpus": threads[0]})
        rows += [{**r, "threads": threads[0]}
                 for r in sweep_deployed(cluster, off, wl, levels, args.min_requests, "serve, batching off")]
    finally:
        cluster.shutdown()

    tps = pd.DataFrame(rows).pivot_table(index=["threads", "concurrency"], columns="label", values="output_tok_per_s")
    table = pd.DataFrame({
        "torch threads": tps.index.get_level_values(0),
        "concurrency / batch": tps.index.get_level_values(1),
        "engine tok/s": tps["engine"].values,
        "serve tok/s": tps["serve"].values,
        "serve ÷ engine": (tps["serve"] / tps["engine"]).values,
        "serve, batching off tok/s": tps["serve, batching off"].values,
        "serve ÷ batching off": (tps["serve"] / tps["serve, batching off"]).values,
    })
    serve = pd.DataFrame([r for r in rows if r["label"] == "serve"])
    cores = serve[["threads", "concurrency", *sorted(c for c in serve.columns if c.startswith("cores "))]]
    log("done")
    print(bench.to_markdown(table))
    print("\nCores each kind of process used while the Serve app ran a level (CPU seconds ÷ wall seconds):\n")
    print(bench.to_markdown(cores.rename(columns={"threads": "torch threads"})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
