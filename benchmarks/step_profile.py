"""Where a decode step's time goes: the transformers engine behind the server's continuous batcher.

At each concurrency c of `--levels`, a closed loop of c asyncio clients in this process (as
`bench_common.batcher_limit`: `TransformersEngine.prepare`/`submit`, each client streaming its request
to the end and then sending its next; no HTTP, no Ray) keeps the batch full with requests of
`--min-tokens`..`--max-tokens` tokens (ignore_eos, seeded lengths), so rows leave and join as on a
server. The scheduler's own methods are timed; per decode step (mean over `--steps` steps, prefills apart):

    mask+pos  step() less its forward and _absorb: the attention mask and positions of the new column
    forward   the model's forward pass
    sample    _sample: each row's next token
    rows      _absorb less sample and drop: per row, push (detokenize, stop strings, EOS) and emit/finish (what
              a row's callbacks cost: a hand-off to the event loop each, or a put into the batcher's outbox)
    drop      drop(): finished rows out of the batch and its KV cache, then the trim
    sched     the scheduler iteration less step and prefill: aborts, admission, the outbox's flushes

"python" is a step's time less its forward pass; "step tok/s" is tokens decoded by the measured steps over
their wall time (gaps between iterations included: the event loop streaming the text competes for the GIL).
`--sampling`: "greedy" (temperature 0), "mixed" (a quarter each: greedy, top_p 0.95, top_p 0.95 seeded,
temperature 1 without top_p).

`--load-on`: "loop" (as the server does: the model loads on the batcher's own thread, fresh for each level) or
"main" (loaded once on this process's main thread and handed to each batcher, as this script did before round
5: two OpenMP pools then share the cores, the slow case of benchmarks/README.md, "The served path, round 5").

    python benchmarks/step_profile.py [--levels 8,32] [--steps 200] [--sampling greedy,mixed] [--load-on loop]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from itertools import cycle

import pandas as pd

from bench_common import cpu_info, load_offline_engine, log
from llmserve_nb import bench
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest, TransformersEngine

PHASES = ["mask+pos", "forward", "sample", "rows", "drop", "sched"]


def sampling_of(kind: str, i: int) -> dict:
    if kind == "greedy" or i % 4 == 0:
        return {}
    if i % 4 == 3:
        return dict(temperature=1.0)
    return dict(temperature=0.8, top_p=0.95, seed=i if i % 4 == 2 else None)


class StepClock:
    """Times the batcher's iteration and the engine's step parts from the scheduler thread. Calls inside a
    prefill (it runs the same forward and _absorb) are left to the prefill's own total."""

    def __init__(self, served: TransformersEngine):
        self.steps: list[dict] = []
        self.prefills: list[float] = []
        self.wanted = 0  # steps to record; the clients stop sending then, and the batch drains unrecorded
        self._current: dict[str, float] = defaultdict(float)
        self._in_step = False
        model, batcher = served.model, served.batcher
        for name in ("_forward", "_sample", "_absorb", "drop"):
            setattr(model, name, self._part(name, getattr(model, name)))
        real_step, real_prefill, real_iteration = model.step, model.prefill, batcher._iteration

        def step(batch):
            self._current["rows_in_batch"] = len(batch.rows)
            self._in_step = True
            t0 = time.perf_counter()
            try:
                return real_step(batch)
            finally:
                self._current["step"] += time.perf_counter() - t0
                self._in_step = False

        def prefill(rows):
            t0 = time.perf_counter()
            try:
                return real_prefill(rows)
            finally:
                self._current["prefill"] += time.perf_counter() - t0

        def iteration():
            self._current = defaultdict(float)
            t0 = time.perf_counter()
            real_iteration()
            t1 = time.perf_counter()
            if len(self.steps) < self.wanted and "step" in self._current:
                self.steps.append({**self._current, "iteration": t1 - t0, "start": t0, "end": t1})
                if self._current["prefill"]:
                    self.prefills.append(self._current["prefill"])

        model.step, model.prefill, batcher._iteration = step, prefill, iteration

    def _part(self, name: str, fn):
        def timed(*a, **k):
            if not self._in_step:
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._current[name] += time.perf_counter() - t0
        return timed

    def summary(self) -> dict:
        df = pd.DataFrame(self.steps).fillna(0.0)
        ms = {
            "mask+pos": df["step"] - df["_forward"] - df["_absorb"],
            "forward": df["_forward"],
            "sample": df["_sample"],
            "rows": df["_absorb"] - df["_sample"] - df["drop"],
            "drop": df["drop"],
            "sched": df["iteration"] - df["step"] - df["prefill"],
        }
        out = {"steps": len(df), "rows/step": df["rows_in_batch"].mean()}
        out.update({f"{p} ms": ms[p].mean() * 1e3 for p in PHASES})
        total = sum(ms[p] for p in PHASES)
        out["step+sched ms"] = total.mean() * 1e3
        out["python ms"] = (total - ms["forward"]).mean() * 1e3
        out["python %"] = 100 * (total - ms["forward"]).sum() / total.sum()
        n = len(self.prefills)
        out["prefill ms (count)"] = f"{1e3 * sum(self.prefills) / max(n, 1):.1f} ({n})"
        wall = df["end"].max() - df["start"].min()
        out["step tok/s"] = df["rows_in_batch"].sum() / wall
        return out


def profile(engine, c: int, kind: str, steps: int, items: list) -> tuple[dict, dict]:
    """The level's row, and how the engine was loaded. `engine` None: loaded on the batcher's thread."""
    served = TransformersEngine(EngineConfig(max_num_seqs=c), model=engine)
    clock = StepClock(served)
    todo = cycle(enumerate(items))

    async def closed_loop(more) -> None:
        async def user() -> None:
            while more():
                i, (prompt, _, n_out) = next(todo)
                req = GenerationRequest(prompt=prompt, max_tokens=n_out, ignore_eos=True, **sampling_of(kind, i))
                [stream] = served.submit([await served.prepare(req)])
                await stream.collect()

        await asyncio.gather(*(user() for _ in range(c)))

    try:
        warm_up = iter([True] * c)  # one request per client warms this batch shape up, unrecorded
        asyncio.run(closed_loop(lambda: next(warm_up, False)))
        clock.wanted = steps
        asyncio.run(closed_loop(lambda: len(clock.steps) < steps))
    finally:
        served.close()
    row = {"concurrency": c, "sampling": kind, **clock.summary()}
    log(f"c={c} {kind}: {row['step+sched ms']:.1f} ms/step, python {row['python ms']:.1f} ms, "
        f"{row['step tok/s']:.1f} tok/s")
    return row, {"model": served.model_name, **served.model.load_timings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="8,32", help="comma list of concurrencies (= the batch, kept full)")
    p.add_argument("--steps", type=int, default=200, help="decode steps measured per level and sampling")
    p.add_argument("--sampling", default="greedy,mixed", help="comma list of greedy, mixed")
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--load-on", choices=["loop", "main"], default="loop")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    kinds = [k.strip() for k in args.sampling.split(",") if k.strip()]
    if set(kinds) - {"greedy", "mixed"}:
        p.error(f"--sampling takes greedy and mixed, got {args.sampling}")

    engine = load_offline_engine() if args.load_on == "main" else None
    items = bench.Workload(num_requests=256, input_tokens=args.input_tokens,
                           output_tokens=(args.min_tokens, args.max_tokens)).items()
    rows, loads = zip(*(profile(engine, c, kind, args.steps, items) for c in levels for kind in kinds))
    cpu, load = cpu_info(), loads[-1]
    print(f"{cpu['model']}, {cpu['cpus']} CPUs ({cpu['flags']}); torch threads {load['torch_threads']}; "
          f"{load['model']} {load['dtype']}, linear {load['cpu_linear']}; loaded on the {args.load_on} thread\n")
    print(bench.to_markdown(pd.DataFrame(list(rows))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
