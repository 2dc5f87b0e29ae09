"""Soak: a long mixed-length run on one replica at concurrency 32, with clients that hang up early.

Deploys this checkout's Serve app (1 replica, max_batch_size = the concurrency) on a Ray head of its
own, or drives `--url` (any OpenAI-compatible server on this machine), then prints one row per
`--window` (60 s): TPOT p50, tok/s streamed in that window, short-request e2e p50, errors, dropped;
and the last window's TPOT p50 over the first's (at most 1.1: decode speed held over the run).

The first minutes of a closed loop are not steady state: every client starts at once with a short
context, and long requests accumulate in the batch until finishes balance arrivals, so the live KV
width (and with it the attention cost of a step) ramps up for a few minutes. The last window is also
compared with the first window after `--settle-minutes`; growth beyond that ramp would be uptime
itself costing speed (a leak, a cache that only grows).

The run is bounded by `--minutes` and by `--max-requests`, and talks to 127.0.0.1 only.

    python benchmarks/soak.py [--minutes 10] [--concurrency 32] [--drop-fraction 0.1] [--url http://127.0.0.1:8000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from bench_common import deploy_on, log, ray_head
from llmserve_nb import bench

_WINDOW_COLUMNS = ["window", "completed", "errors", "dropped", "streamed_tok_per_s", "tpot_ms_p50", "tpot_vs_first",
                   "ttft_ms_p50", "short_e2e_ms_p50"]
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--window", type=float, default=60.0, help="seconds per row of the table")
    p.add_argument("--settle-minutes", type=float, default=3.0,
                   help="the closed loop's ramp to steady state; also compare against the window after it")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=20000, help="upper bound on requests sent")
    p.add_argument("--mixed-tokens", default="16-512", help="max_tokens log-uniform over LO-HI, EOS honoured")
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--drop-fraction", type=float, default=0.1, help="share of clients that hang up early")
    p.add_argument("--drop-after", default="2-8", help="text chunks before they hang up: N or LO-HI")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="soak this server instead of deploying the Serve app (loopback only)")
    p.add_argument("--out", default="runs/soak")
    args = p.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in _LOOPBACK:
        p.error(f"--url {args.url}: the soak only drives servers on this machine (127.0.0.1)")
    lo, hi = (int(x) for x in args.mixed_tokens.split("-"))
    drop_after = tuple(int(x) for x in args.drop_after.split("-")) if "-" in args.drop_after else int(args.drop_after)
    wl = bench.mixed_workload(num_requests=args.max_requests, output_tokens=(lo, hi), input_tokens=args.input_tokens,
                              timeout_s=args.timeout, drop_fraction=args.drop_fraction, drop_after_chunks=drop_after,
                              seed=args.seed)
    duration_s = args.minutes * 60
    if args.url:
        run = soak(args.url, wl, duration_s, args.concurrency, None, None)
    else:
        overrides = {"batching.max_batch_size": args.concurrency, "deployment.num_replicas": 1,
                     "engine.torch_threads": args.torch_threads}
        with ray_head("soak") as head:
            app = deploy_on(head, overrides)
            log(f"deployed at {app['base_url']}")
            run = soak(app["base_url"], wl, duration_s, args.concurrency, app["model"], app["api_key"])
    table = bench.soak_table(run, args.window)
    summary = run.summary()
    bench.BenchReport([run]).save(Path(args.out))
    table.to_csv(Path(args.out) / "windows.csv", index=False)
    print(f"Soak: {args.minutes:g} min, concurrency {args.concurrency}, max_tokens log-uniform {args.mixed_tokens} "
          f"(EOS honoured), {args.drop_fraction:.0%} of clients hang up after {args.drop_after} chunks, "
          f"{args.window:g} s windows\n")
    print(bench.to_markdown(table, _WINDOW_COLUMNS))
    ratio = table["tpot_vs_first"].iloc[-1]
    verdict = "held" if ratio <= 1.1 else "drifted" if ratio == ratio else "no TPOT in the first or last window"
    print(f"\nTPOT p50, last window / first: {ratio:.2f} ({verdict}; the bar is <= 1.10)")
    settled = int(args.settle_minutes * 60 // args.window)
    if 0 < settled < len(table) - 1:
        steady = table["tpot_ms_p50"].iloc[-1] / table["tpot_ms_p50"].iloc[settled]
        print(f"TPOT p50, last window / window {settled + 1} (after the {args.settle_minutes:g}-minute ramp): "
              f"{steady:.2f}")
    print(f"Whole run: {summary['completed']} completed, {summary['errors']} errors, {summary['dropped']} dropped, "
          f"{summary['incomplete']} cut at the end; {summary['output_tok_per_s']:.1f} useful tok/s; "
          f"short-request e2e p50/p99 {summary['short_e2e_ms_p50']:.0f}/{summary['short_e2e_ms_p99']:.0f} ms")
    if summary["errors"]:
        print(f"first error: {summary['error_example']}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def soak(url, wl, duration_s, concurrency, model, api_key) -> bench.BenchRun:
    t0 = time.monotonic()
    log(f"soaking {url} for {duration_s:.0f} s at concurrency {concurrency}")
    run = bench.soak(url, wl, duration_s=duration_s, concurrency=concurrency, model=model, api_key=api_key,
                     progress=False)
    log(f"soak done in {time.monotonic() - t0:.0f} s")
    return run


if __name__ == "__main__":
    sys.exit(main())
