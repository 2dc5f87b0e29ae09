"""What the Serve app costs and gains over calling the engine directly, measured side by side.

Generated tok/s at each concurrency of `--levels` through the Serve app (max_batch_size = the top level),
against the same engine offline on static batches of that size (the limit: no HTTP, no queueing; in a child
process, so that this process holds one OpenMP pool) and behind the server's continuous batcher in this
process (a closed loop of c asyncio clients, no HTTP, no Ray), at every torch thread count of
`--torch-threads`: all three sides with `engine.torch_threads=t`, the app also with `deployment.num_cpus=t`.

The three sides are interleaved, not run one after the other: with the app deployed and idle, the engine
runs a level, then the batcher, then the app, `--repeats` times, every other time in reverse order. This
machine's speed drifts by a quarter over minutes, and all sides then see the same drift and the same idle
Ray processes; the table has the mean and each repeat's ratio. The app with batching off (max_batch_size
1) runs once, at the first thread count. Fixed output length (ignore_eos), ~30-token prompts. A second
table has the cores each kind of process (the replica, Serve's proxy and controller, Ray's own processes,
this process: the load generator) used while the app ran each level.

    python benchmarks/serve_vs_engine.py [--levels 8,32] [--min-requests 64] [--torch-threads 1,2] [--repeats 3] \
        [--no-batching-off]
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from bench_common import (
    OfflineEngineProcess, add_workload_args, batcher_limit, cpu_by_process, level_workload, levels_of,
    log, sweep_deployed,
)
from llmserve_nb import bench
from llmserve_nb.cluster import connect
from llmserve_nb.config import AppConfig
from llmserve_nb.engine import TransformersEngine


SIDES = ("engine", "batcher", "serve")


def interleaved(cluster, engine, served, cfg, wl: bench.Workload, levels: list[int], min_requests: int,
                repeats: int) -> list[dict]:
    """Deploy `cfg`; per level, `engine` (static batches, in its own process), `served` (the batcher, in
    this one) and the app in turns, `repeats` times; summary rows."""
    app = cluster.deploy(cfg)
    kw = dict(model=app.model, api_key=app.api_key, progress=False)
    try:
        bench.run_benchmark(app.base_url, level_workload(wl, 1, 1), concurrency=1, **kw)  # first request warms up
        rows = []
        for c in levels:
            for i in range(repeats):
                for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                    if side == "engine":
                        row = engine.limit([c], wl, min_requests, "engine")[0]
                    elif side == "batcher":
                        row = batcher_limit(served, [c], wl, min_requests, "batcher")[0]
                    else:
                        with cpu_by_process() as cores:
                            run = bench.run_benchmark(app.base_url, level_workload(wl, c, min_requests), concurrency=c,
                                                      label="serve", **kw)
                        row = {**run.summary(), "label": "serve", "concurrency": c,
                               **{f"cores {k}": v for k, v in cores.items()}}
                        log(f"serve c={c}: {row['output_tok_per_s']:.1f} tok/s")
                    rows.append({**row, "repeat": i})
        return rows
    finally:
        app.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=90.0)
    ncores = len(os.sched_getaffinity(0))
    p.add_argument("--torch-threads", default=",".join(dict.fromkeys(["1", str(ncores)])),
                   help="comma list of torch thread counts, each for both the engine offline and the app")
    p.add_argument("--repeats", type=int, default=3, help="engine and app turns per level")
    p.add_argument("--batching-off", action=argparse.BooleanOptionalAction, default=True,
                   help="also the app with max_batch_size 1, once (minutes at c=32)")
    args = p.parse_args(argv)
    levels = levels_of(args)
    threads = [int(t) for t in args.torch_threads.split(",") if t.strip()]
    wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens, duration_s=args.level_duration,
                        timeout_s=args.timeout)

    cluster = connect()
    rows = []
    try:
        base = AppConfig().with_overrides(**{"batching.max_batch_size": max(levels)})
        for t in threads:
            cfg = base.with_overrides(**{"engine.torch_threads": t, "deployment.num_cpus": t})
            engine = OfflineEngineProcess(t)
            served = TransformersEngine(cfg.engine.model_copy(update={"max_num_seqs": max(levels)}))
            try:
                rows += [{**r, "threads": t} for r in
                         interleaved(cluster, engine, served, cfg, wl, levels, args.min_requests, args.repeats)]
            finally:
                served.close()
                engine.close()
        if args.batching_off:
            off = base.with_overrides(**{"batching.max_batch_size": 1, "engine.torch_threads": threads[0],
                                         "deployment.num_cpus": threads[0]})
            rows += [{**r, "threads": threads[0]}
                     for r in sweep_deployed(cluster, off, wl, levels, args.min_requests, "serve, batching off")]
    finally:
        cluster.shutdown()

    df = pd.DataFrame(rows)
    paired = df[df["label"].isin(SIDES)].pivot_table(
        index=["threads", "concurrency", "repeat"], columns="label", values="output_tok_per_s")
    per_repeat = (paired["serve"] / paired["engine"]).groupby(level=[0, 1])
    spread = per_repeat.agg(lambda r: f"{r.min():.2f}-{r.max():.2f}")
    tps = df.pivot_table(index=["threads", "concurrency"], columns="label", values="output_tok_per_s")
    table = pd.DataFrame({
        "torch threads": tps.index.get_level_values(0),
        "concurrency / batch": tps.index.get_level_values(1),
        "engine tok/s": tps["engine"].values,
        "batcher tok/s": tps["batcher"].values,
        "serve tok/s": tps["serve"].values,
        "batcher ÷ engine": (tps["batcher"] / tps["engine"]).values,
        "serve ÷ batcher": (tps["serve"] / tps["batcher"]).values,
        "serve ÷ engine": (tps["serve"] / tps["engine"]).values,
        "serve ÷ engine, each repeat": spread.reindex(tps.index).values,
    })
    if args.batching_off:
        table["serve, batching off tok/s"] = tps["serve, batching off"].values
        table["serve ÷ batching off"] = (tps["serve"] / tps["serve, batching off"]).values
    serve = df[df["label"] == "serve"]
    cores = serve.groupby(["threads", "concurrency"])[sorted(c for c in serve.columns if c.startswith("cores "))] \
        .mean().round(2).reset_index()
    log("done")
    print(bench.to_markdown(table))
    print("\nCores each kind of process used while the Serve app ran a level (CPU seconds ÷ wall seconds):\n")
    print(bench.to_markdown(cores.rename(columns={"threads": "torch threads"})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
