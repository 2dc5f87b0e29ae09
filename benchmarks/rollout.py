"""Rollout under load: two versions of the embedded model behind the rollout router, closed-loop sticky
load through the public route while the canary's share goes through --steps and is promoted.

Prints requests sent, failed (must be 0), requests by version, stickiness violations (must be none) and
TTFT / e2e p50 and p99 before the switch, during it (shifts and promote) and after, as markdown.

    python benchmarks/rollout.py [--concurrency 8] [--sessions 64] [--max-tokens 32] [--steps 10,25,50,100]
                                 [--hold-s 30] [--baseline-s 30] [--after-s 30] [--address http://head:8265]
    python benchmarks/rollout.py --smoke     # tiny sizes, about 2-3 minutes on 2 cores

Runs on an embedded local Ray unless --address names a running cluster's dashboard.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _wait_time_or_requests(load, seconds: float, min_requests: int) -> None:
    """Hold for `seconds`, and until `min_requests` more requests completed (at most 300 s more)."""
    n0 = load.completed()
    time.sleep(seconds)
    load.wait_completed(n0 + min_requests, timeout_s=300.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="a running cluster's dashboard (default: embedded local Ray)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--steps", default="10,25,50,100", help="canary share (%%) per step")
    p.add_argument("--hold-s", type=float, default=30.0, help="seconds per step")
    p.add_argument("--baseline-s", type=float, default=30.0, help="seconds at 100 %% stable before the first shift")
    p.add_argument("--after-s", type=float, default=30.0, help="seconds after the promote")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per model replica")
    p.add_argument("--replicas", type=int, default=1, help="replicas per version")
    p.add_argument("--canary", default='{"batching.max_batch_size": 4, "engine.max_num_seqs": 8}',
                   help="AppConfig overrides of the canary, JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a quick end-to-end check")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.smoke:
        a.concurrency, a.sessions, a.max_tokens, a.input_tokens = 3, 12, 6, 16
        a.steps, a.hold_s, a.baseline_s, a.after_s = "50,100", 5.0, 5.0, 5.0

    from llmserve_nb import AppConfig, connect
    from llmserve_nb.bench import Workload
    from llmserve_nb.rollout import Rollout, TrafficLoad

    cluster = connect(address=a.address) if a.address else connect()
    stable = AppConfig(name="bench-v1", route_prefix="/bench-v1").with_overrides(
        **{"deployment.num_cpus": a.num_cpus, "deployment.num_replicas": a.replicas,
           "engine.max_tokens_limit": max(64, a.max_tokens)})
    canary = stable.with_overrides(name="bench-v2", route_prefix="/bench-v2", **json.loads(a.canary))
    ro = Rollout(cluster, stable=stable, canary=canary, name="bench-router", route_prefix="/bench",
                 progress=lambda m: print(f"[rollout] {m}", file=sys.stderr, flush=True))
    try:
        ro.deploy()
        wl = Workload(num_requests=4096, input_tokens=a.input_tokens, output_tokens=a.max_tokens, timeout_s=300)
        load = TrafficLoad(ro.base_url, wl, concurrency=a.concurrency, sessions=a.sessions)
        ro.on_change = load.mark
        steps = [float(s) for s in a.steps.split(",") if s.strip()]
        t_switch = None
        with load:
            _wait_time_or_requests(load, a.baseline_s, a.concurrency)
            load.mark("switch")
            t_switch = time.monotonic()
            for w in steps:
                ro.shift(w)
                _wait_time_or_requests(load, a.hold_s, 1)
            ro.promote()
            load.mark("promoted")
            switch_s = time.monotonic() - t_switch
            _wait_time_or_requests(load, a.after_s, a.concurrency)
        phases = load.phases({"before": ("start", "switch"), "during": ("switch", "promoted"),
                              "after": ("promoted", None)})
        total = load.summary()
        violations = load.stickiness_violations()
    finally:
        ro.shutdown()
        cluster.shutdown()

    print(f"\n## Rollout under load: {stable.name} -> {canary.name} ({a.canary}), steps {a.steps} %, "
          f"c={a.concurrency}, {a.sessions} sessions, {a.max_tokens} tokens/request\n")
    print(f"requests sent: {total['requests']}, completed: {total['completed']}, **failed: {total['failed']}**, "
          f"by version: {total['by_version']}, stickiness violations: {len(violations)}, "
          f"switch (first shift to old version removed): {switch_s:.1f} s\n")
    print("| phase | requests | failed | by version | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in phases.items():
        print(f"| {name} | {s['requests']} | {s['failed']} | {s['by_version']} | {s['ttft_ms_p50']:.0f} | "
              f"{s['ttft_ms_p99']:.0f} | {s['e2e_ms_p50']:.0f} | {s['e2e_ms_p99']:.0f} |")
    if total["failed"]:
        print(f"\nfirst failure: {total['error_example']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"total": total, "phases": phases, "stickiness_violations": violations,
                       "switch_s": switch_s, "args": vars(a)}, f, indent=1, default=str)
    return 0 if total["failed"] == 0 and not violations else 1


if __name__ == "__main__":
    sys.exit(main())
