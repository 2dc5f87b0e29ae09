"""`llmserve-nb bench`: a sweep (closed or open loop), a trace replay or a soak against any OpenAI-compatible
server, with goodput under an SLO."""
from __future__ import annotations

import argparse
import os
import sys

from llmserve_nb.config import API_KEY_ENV
from llmserve_nb.bench.arrivals import ARRIVALS, arrival_times
from llmserve_nb.bench.results import ERROR_KINDS
from llmserve_nb.bench.report import soak_table, summary_columns, to_markdown
from llmserve_nb.bench.runner import soak, sweep
from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.workload import Length, Workload

_SOAK_COLUMNS = ("window", "completed", "errors", "dropped", "streamed_tok_per_s", "tpot_ms_p50", "tpot_vs_first",
                 "ttft_ms_p50", "short_e2e_ms_p50")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _length(s: str) -> Length:
    if "-" in s:
        lo, hi = s.split("-", 1)
        return int(lo), int(hi)
    return int(s)


def _slo(s: str) -> SLO:
    try:
        return SLO.parse(s)
    except ValueError as e:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, e2e, tok/s)",
        description="Closed-loop sweep over --concurrency levels, open loop at --rate req/s (Poisson, or gamma "
                    "with --burstiness), a --trace replay, or --soak MINUTES at the first concurrency level with "
                    "a per-window table. --slo adds goodput: requests (and tokens) per second that met it.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1")
    p.add_argument("--model", help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"sent as 'Authorization: Bearer' (default: ${API_KEY_ENV})")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="comma list, e.g. 1,8,32")
    load.add_argument("--rate", type=_floats, help="comma list of arrival rates in req/s (open loop)")
    load.add_argument("--trace", metavar="FILE.jsonl",
                      help="replay a trace: one JSON object per line with timestamp (s), input_tokens, "
                           "output_tokens, optional prompt")
    p.add_argument("--arrival", choices=ARRIVALS, default=None,
                   help="open-loop gaps: poisson (default), or gamma with --burstiness")
    p.add_argument("--burstiness", type=float, default=None,
                   help="gamma shape (vLLM's): 1 = Poisson, < 1 burstier, > 1 more even; implies --arrival gamma")
    p.add_argument("--time-scale", type=float, default=1.0, help="--trace timestamps are multiplied by this")
    p.add_argument("--slo", type=_slo, metavar="SPEC",
                   help="per-request bounds for goodput, e.g. ttft=1s,tpot=100ms,e2e=10s,attainment=99%%")
    p.add_argument("--requests", type=int, default=32, help="requests per level (the soak's upper bound)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds per level before in-flight requests are cut")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--input-tokens", type=_length, default=30, help="N or LO-HI")
    p.add_argument("--max-tokens", type=_length, default=None,
                   help="N or LO-HI (default 64 with ignore_eos; 16-512 with --mixed)")
    p.add_argument("--mixed", action="store_true",
                   help="mixed lengths: max_tokens log-uniform over --max-tokens, EOS honoured")
    p.add_argument("--drop-fraction", type=float, default=0.0,
                   help="share of streaming requests whose client hangs up early (counted as dropped)")
    p.add_argument("--drop-after", type=_length, default=4, help="text chunks before a dropping client hangs up")
    p.add_argument("--shared-prefix-tokens", type=int, default=0,
                   help="prefix-repetition workload: each prompt starts with one of --num-prefixes shared "
                        "prefixes of N tokens, then its own --input-tokens")
    p.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes (with --shared-prefix-tokens)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--no-stream", action="store_true", help="ask for plain JSON responses")
    p.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="discarded requests before the first level")
    p.add_argument("--soak", type=float, metavar="MINUTES",
                   help="one long run at the first --concurrency level; prints per-window figures")
    p.add_argument("--window", type=float, default=60.0, help="soak window, seconds")
    p.add_argument("--label", default="run")
    p.add_argument("--out", help="directory for summary.csv, requests.csv, report.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli_bench)


def _workload(args) -> Workload:
    mixed = args.mixed
    return Workload(
        num_requests=args.requests, input_tokens=args.input_tokens,
        output_tokens=args.max_tokens or ((16, 512) if mixed else 64),
        output_dist="loguniform" if mixed else "uniform",
        duration_s=args.duration, timeout_s=args.timeout, endpoint=args.endpoint, stream=not args.no_stream,
        ignore_eos=not (args.no_ignore_eos or mixed), seed=args.seed,
        drop_fraction=args.drop_fraction, drop_after_chunks=args.drop_after,
        shared_prefix_tokens=args.shared_prefix_tokens, num_prefixes=args.num_prefixes,
    )


def _arrival(args) -> tuple[str, float]:
    """(arrival, burstiness) from the flags: a burstiness alone means gamma."""
    arrival = args.arrival or ("gamma" if args.burstiness is not None else "poisson")
    return arrival, 1.0 if args.burstiness is None else args.burstiness


def _cli_bench(args) -> int:
    from llmserve_nb.bench.results import BenchReport
    from llmserve_nb.bench.trace import load_trace, replay

    try:  # bad flags or an unreadable trace: a message before any request, not a traceback
        wl = _workload(args)
        arrival, burstiness = _arrival(args)
        if (args.arrival or args.burstiness is not None) and not args.rate:
            raise ValueError("--arrival and --burstiness shape an open loop: give --rate")
        if args.soak is not None and (args.rate or args.trace):
            raise ValueError("--soak is a closed loop; give --concurrency, not --rate or --trace")
        for rate in args.rate or ():
            arrival_times(0, rate, arrival, burstiness)
        if not args.time_scale > 0:
            raise ValueError(f"--time-scale must be > 0, got {args.time_scale}")
        trace = load_trace(args.trace) if args.trace else None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.soak is not None:
        run = soak(args.url, wl, duration_s=args.soak * 60, concurrency=args.concurrency[0], model=args.model,
                   label=args.label, progress=not args.no_progress, api_key=args.api_key, slo=args.slo)
        report = BenchReport([run])
        table = soak_table(run, args.window)
        print(to_markdown(table, _SOAK_COLUMNS))
        print(f"\nTPOT p50, last window / first: {table['tpot_vs_first'].iloc[-1]:.2f}")
    elif trace is not None:
        report = BenchReport([replay(args.url, trace, wl, time_scale=args.time_scale, model=args.model,
                                     label=args.label, progress=not args.no_progress, api_key=args.api_key,
                                     slo=args.slo)])
    else:
        report = sweep(
            args.url, wl, concurrency=None if args.rate else args.concurrency, rates=args.rate, model=args.model,
            label=args.label, warmup=args.warmup, progress=not args.no_progress, api_key=args.api_key,
            slo=args.slo, arrival=arrival, burstiness=burstiness,
        )
    summary = report.summary()
    print(to_markdown(summary, summary_columns(summary)))
    if args.slo is not None:
        print(f"\nSLO {args.slo}: " + "; ".join(
            f"{_level(row)} {'met' if row['slo_met'] else 'MISSED'} ({row['slo_attainment']:.1%} good)"
            for _, row in summary.iterrows()))
    if args.out:
        paths = report.save(args.out)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    failed = summary[summary["errors"] > 0]
    for _, row in failed.iterrows():
        kinds = ", ".join(f"{k}={row[f'err_{k}']}" for k in ERROR_KINDS if row[f"err_{k}"])
        print(f"{row['label']} c={row['concurrency']} rate={row['rate']}: {row['errors']} errors ({kinds}); "
              f"e.g. {row['error_example']}", file=sys.stderr)
    if summary["completed"].sum() == 0:
        print(f"error: no request to {args.url} completed", file=sys.stderr)
        return 1
    return 0


def _level(row) -> str:
    """How a summary row was driven: "c=8", "poisson 2 req/s", "trace 0.5 req/s"."""
    import pandas as pd

    if pd.notna(row["concurrency"]):
        return f"c={row['concurrency']:g}"
    return f"{row['arrival']} {row['rate']:g} req/s" if pd.notna(row["rate"]) else str(row["arrival"])
