"""Serve's default autoscaling policy next to the LLM-aware one, on the same load, one after the other.

    python benchmarks/autoscaling_policies.py [--concurrency 24] [--seconds 90] [--target-ttft 1.0]

Each policy gets a fresh app (1 replica, max 2, num_cpus 1 each so both fit on 2 cores) and the same
closed-loop streaming load from `llmserve_nb.bench`. The table: seconds until Serve's target replica
count rose (`scale_up_decided_s`), seconds until the second replica served (`scale_up_s`), the load's TTFT
p50/p99, tok/s and request outcome, the same columns as notebook 02's policy comparison.
"""
from __future__ import annotations

import argparse

import llmserve_nb as lsnb
from llmserve_nb.experiments.autoscaling import POLICY_COLUMNS, scale_up_run
from llmserve_nb.bench import to_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--target-ongoing", type=float, default=8.0, help="default policy: ongoing requests per replica")
    ap.add_argument("--target-ttft", type=float, default=1.0, help="llm policy: p90 TTFT per replica, seconds")
    args = ap.parse_args()
    common = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 3, "downscale_delay_s": 600,
              "look_back_period_s": 15}
    policies = {
        "ongoing_requests": {"policy": "ongoing_requests", "target_ongoing_requests": args.target_ongoing},
        "llm": {"policy": "llm", "target_ttft_s": args.target_ttft},
    }
    cluster = lsnb.connect()
    rows = []
    try:
        for name, extra in policies.items():
            cfg = lsnb.AppConfig(name=f"policy-{name.replace('_', '-')}").with_overrides(**{
                "deployment.num_cpus": 1, "deployment.autoscaling": {**common, **extra}})
            report = scale_up_run(cluster, cfg, concurrency=args.concurrency, seconds=args.seconds,
                                  max_tokens=args.max_tokens, progress=None)
            rows.append({"policy": name, **{k: report[k] for k in (*POLICY_COLUMNS, "max_running")}})
            print(f"{name}: replicas over time {[(r['t_s'], r['running']) for r in report['timeline'][::5]]}")
    finally:
        cluster.shutdown()
    import pandas as pd

    print(to_markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
