"""Replica failure under load: kill one of two replicas mid-load and measure what clients saw.

Starts an embedded Ray in this process (the driver that kills replicas), deploys the Serve app with two
replicas (`--num-cpus` each), runs a steady closed-loop load (`llmserve_nb.bench`, every request with a
client timeout), kills one replica `--kill-at` seconds into it, and prints one row per kind of kill:
requests sent, accepted, succeeded, failed by kind (status and an example message), hung (requests that
ran into their client timeout: must be 0), the time until Serve runs the replacement (`recovery_s`)
and until a request is answered by it (`serving_s`). Kinds:

- `ray_kill`: `ray.kill` on the replica actor (found through Serve's REST details: actor name);
- `sigkill`: SIGKILL to the replica's PID (from the same details);
- `engine_loop`: the process stays up but its engine's decode loop dies; only Serve's health check
  (`LLMServer.check_health`, every `--health-period` s) gets the replica replaced.

    python benchmarks/replica_failure.py [--kinds ray_kill,sigkill,engine_loop] [--load-s 60] [--kill-at 15]
        [--concurrency 8] [--max-tokens 32] [--json out.json]

Smoke: `python benchmarks/replica_failure.py --kinds ray_kill --load-s 15 --kill-at 4 --concurrency 2`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from llmserve_nb import AppConfig, connect
from llmserve_nb.experiments import reliability as rel
from llmserve_nb.bench import Action, Workload

COLUMNS = ["kind", "sent", "accepted", "succeeded", "failed", "failed_by_kind", "hung", "cut_at_end", "recovery_s",
           "serving_s"]


def log(msg: str) -> None:
    print(f"[replica_failure] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="ray_kill,sigkill,engine_loop")
    p.add_argument("--load-s", type=float, default=60.0, help="length of each load")
    p.add_argument("--kill-at", type=float, default=15.0, help="seconds into the load")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--stream", action="store_true", help="stream the answers (failures then show in-band)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (two replicas)")
    p.add_argument("--health-period", type=float, default=2.0, help="Serve health check period, seconds")
    p.add_argument("--recovery-timeout", type=float, default=300.0)
    p.add_argument("--json", help="also write the rows, events and per-second timelines here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - {"ray_kill", "sigkill", "engine_loop"}
    if unknown:
        p.error(f"unknown kinds: {sorted(unknown)}")

    cluster = connect()
    config = AppConfig(name="replica-failure", route_prefix="/replica-failure").with_overrides(**{
        "deployment.num_replicas": 2,
        "deployment.num_cpus": args.num_cpus,
        "deployment.max_ongoing_requests": max(8, args.concurrency),
        "deployment.max_queued_requests": 4 * args.concurrency,
        "deployment.health_check_period_s": args.health_period,
        "deployment.health_check_timeout_s": 20.0,
        "deployment.graceful_shutdown_wait_loop_s": 0.5,
        "deployment.graceful_shutdown_timeout_s": 30.0,
        "batching.max_batch_size": 8,
    })
    rows, detail = [], []
    try:
        log("deploying 2 replicas ...")
        app = cluster.deploy(config, progress=None, timeout_s=900)
        for kind in kinds:
            rel.wait_replaced(cluster, app.name, gone="-", target=2, timeout_s=args.recovery_timeout)
            log(f"{kind}: {args.load_s:g} s of load at c={args.concurrency}, kill at {args.kill_at:g} s")
            wl = Workload(num_requests=1_000_000, input_tokens=args.input_tokens, output_tokens=args.max_tokens,
                          stream=args.stream, duration_s=args.load_s, timeout_s=args.timeout)
            tl = rel.run_load(
                app.base_url, wl, concurrency=args.concurrency, cluster=cluster, app_name=app.name, model=app.model,
                actions=[Action(args.kill_at, "kill", lambda kind=kind: rel.kill_and_recover(
                    cluster, app, kind, target=2, timeout_s=args.recovery_timeout))],
            )
            s = rel.failure_summary(tl, "kill")
            event = tl.event("kill")
            kill = (event.value if event is not None else None) or {}
            row = {"kind": kind, **{k: s[k] for k in COLUMNS if k in s},
                   "recovery_s": kill.get("recovery_s", math.nan), "serving_s": kill.get("serving_s", math.nan)}
            if "kill_error" in s:
                row["error"] = s["kill_error"]
            rows.append(row)
            detail.append({"kind": kind, "summary": s, "events": tl.events, "per_second": rel.per_second(tl)})
            log(f"{kind}: {json.dumps(row, default=str)}")
            for k, v in s["failure_examples"].items():
                log(f"  {k}: {v}")
    finally:
        cluster.shutdown()

    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "detail": detail}, f, indent=1, default=str)
    return 0 if all(r["hung"] == 0 for r in rows) else 1


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={n}" for k, n in v.items()) or "-"
    return str(v)


def _table(rows: list[dict]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


if __name__ == "__main__":
    sys.exit(main())
