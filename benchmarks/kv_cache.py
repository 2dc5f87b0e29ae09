"""Decode-step cost by KV width: transformers' concatenating cache against the in-place slab cache.

One static batch of `--batch` rows decodes to `--width` columns, once with each cache, alternating
runs in one process on one loaded model (each KV cache is measured at the same widths, back to back).
The concatenating cache copies every layer's keys and values on every step, so its step cost grows
with the width; the slab writes one column in place, leaving attention as the only width-dependent cost.

    python benchmarks/kv_cache.py [--batch 32] [--width 576] [--every 80] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import pandas as pd

from bench_common import cpu_info, load_offline_engine, log
from llmserve_nb import bench
from llmserve_nb.engine import GenerationRequest
from llmserve_nb.engine import hf


def step_times(engine, batch_size: int, width: int, every: int) -> dict[int, float]:
    """ms per decode step, averaged over each stretch of `every` steps, keyed by the width reached."""
    import torch

    reqs = [GenerationRequest(prompt=f"Write a short story about robot number {i} who learns to paint.",
                              max_tokens=width, ignore_eos=True) for i in range(batch_size)]
    rows = [hf.Row(engine.new_output(r, len(ids)), ids, None, emit=lambda d: None, finish=lambda r: None,
                   fail=print) for r, ids in ((r, engine.prompt_ids(r)) for r in reqs)]
    out: dict[int, float] = {}
    with torch.inference_mode():
        batch = engine.prefill(rows)
        last = time.perf_counter()
        while batch.width + every <= width:
            for _ in range(every):
                engine.step(batch)
            now = time.perf_counter()
            out[batch.width] = 1000 * (now - last) / every
            last = now
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--every", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2, help="runs per cache, alternating")
    args = p.parse_args(argv)
    engine = load_offline_engine()
    runs: dict[str, list[dict[int, float]]] = {"concatenating": [], "slab": []}
    for r in range(args.rounds):
        for label in runs:
            log(f"round {r + 1}: {label}")
            if label == "concatenating":  # the cache transformers builds, left as it is
                with mock.patch.object(hf, "to_slabs", lambda cache: None):
                    runs[label].append(step_times(engine, args.batch, args.width, args.every))
            else:
                runs[label].append(step_times(engine, args.batch, args.width, args.every))
    widths = sorted(runs["slab"][0])
    median = {label: [statistics.median(run[w] for run in rs) for w in widths] for label, rs in runs.items()}
    table = pd.DataFrame({
        "width": widths,
        "concatenating ms/step": median["concatenating"],
        "slab ms/step": median["slab"],
    })
    table["slab ÷ concatenating"] = table["slab ms/step"] / table["concatenating ms/step"]
    table[f"slab tok/s (batch {args.batch})"] = 1000 * args.batch / table["slab ms/step"]
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; batch {args.batch}; "
          f"median of {args.rounds} alternating runs per cache")
    print(bench.to_markdown(table, digits=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
