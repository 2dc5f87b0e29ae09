"""The decode loop on a thread of the replica against an engine-core process, measured side by side.

Today the scheduler thread (`ContinuousBatcher`) decodes in the replica's process and shares the GIL with
the event loop that streams. vLLM instead runs an engine core per replica: a process that owns the model
and the scheduler, takes submits and aborts over ZMQ and sends each step's new token ids for every row in
one message, while the front end detokenizes, applies stop strings and streams. This script measures:

- A: `TransformersEngine` in this process, as a replica runs it (prepare -> submit -> consume streams);
- B: `EngineCoreClient`, what a replica runs with `EngineConfig(engine_core="process")`: an engine-core
  process (`llmserve_nb.engine.core`) owns `HFEngine` + `ContinuousBatcher`; where A hands its streams
  their text (after admission and after each step) it sends one message over a pipe with each row's new
  token ids and the rows that finished. This process tokenizes, detokenizes with `OutputText` (stop strings
  included: a row the front end stops is aborted in the core), and feeds the streams;
- C: `HFEngine.generate` on static batches of c in this process, no stream consumer: the ceiling.

A1 is A with 1 torch thread: it tells what B1 gains from its thread count from what it gains from the process.

All sides see the same closed loop of c asyncio clients (C: batches of c), the same prompts, and the same
torch thread count unless named (B1 = the core with 1 thread, so the front end keeps a core of its own).
They are interleaved: per level, A B C ... then the reverse, `--rounds` times, because this machine's
speed drifts by a quarter over minutes. Each side runs each time in a fresh process (the model loads
anew), so that no process holds two OpenMP pools. CPU is cores used (CPU seconds / wall) per process, from psutil.

    python benchmarks/engine_process.py [--levels 32,8] [--rounds 2] [--variants A,A1,B2,B1,C] [--mixed]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil

from bench_common import cpu_info, level_workload, log
from llmserve_nb import bench
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import EngineCoreClient, GenerationRequest, HFEngine
from llmserve_nb.engine.loading import cpu_threads


# ---- measuring ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0


class CpuMeter:
    """Cores used between enter and exit: this process, its event loop thread, the core processes, and
    the scheduler threads (A's in this process, B's in its core; the rest of a side's engine CPU is OpenMP's)."""

    def __init__(self, cores: list[EngineCoreClient], schedulers: list[tuple[int, int]]):
        self.me = psutil.Process()
        self.children = [psutil.Process(c.proc.pid) for c in cores]
        self.schedulers = schedulers  # (pid, native thread id)

    def _sample(self) -> tuple[float, ...]:
        of_thread = lambda pid, tid: sum(t.user_time + t.system_time for t in psutil.Process(pid).threads()
                                         if t.id == tid)
        t = self.me.cpu_times()
        kids = sum(sum(c.cpu_times()[:2]) for c in self.children)
        return (t.user + t.system, of_thread(self.me.pid, threading.get_native_id()), kids,
                sum(of_thread(pid, tid) for pid, tid in self.schedulers))

    def __enter__(self):
        self.before, self.t0 = self._sample(), time.monotonic()
        return self

    def __exit__(self, *exc):
        after, wall = self._sample(), time.monotonic() - self.t0
        self.parent, self.loop, self.child, self.scheduler = ((a - b) / wall for a, b in zip(after, self.before))


async def closed_loop(engine, reqs: list[GenerationRequest], c: int, chunk_work_s: float = 0.0
                      ) -> tuple[list[Timing], float]:
    """c clients, each sending its next request when its stream ends; every request's timing. Each
    output costs the event loop `chunk_work_s` of Python (the server's SSE framing and Serve's streaming)."""
    todo = list(reversed(reqs))
    timings: list[Timing] = []

    async def user() -> None:
        while todo:
            t = Timing(time.perf_counter())
            timings.append(t)
            [stream] = engine.submit([await engine.prepare(todo.pop())])
            async for out in stream:
                if t.first is None and (out.text or out.finished):
                    t.first = time.perf_counter()
                if out.result is not None:
                    t.end, t.tokens = time.perf_counter(), out.result.completion_tokens
                until = time.perf_counter() + chunk_work_s
                while time.perf_counter() < until:
                    pass

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(c)))
    return timings, time.perf_counter() - t0


def static_batches(model: HFEngine, reqs: list[GenerationRequest], c: int) -> tuple[list[Timing], float]:
    timings: list[Timing] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), c):
        batch = [Timing(time.perf_counter()) for _ in reqs[i:i + c]]

        def on_token(j: int, _delta: str, batch=batch) -> None:
            if batch[j].first is None:
                batch[j].first = time.perf_counter()

        for t, res in zip(batch, model.generate(reqs[i:i + c], on_token=on_token)):
            t.end, t.tokens = time.perf_counter(), res.completion_tokens
            t.first = t.first or t.end
        timings += batch
    return timings, time.perf_counter() - t0


async def measure(side: str, engines: dict, model: HFEngine, reqs: list[GenerationRequest], c: int,
                  meter: CpuMeter, chunk_work_s: float) -> dict:
    warm = [dataclasses.replace(r, max_tokens=8, ignore_eos=True) for r in reqs[:c]]
    if side == "C":
        static_batches(model, warm, c)  # the first pass at a new batch shape is slow
        with meter as cpu:
            timings, wall = static_batches(model, reqs, c)
    else:
        await closed_loop(engines[side], warm, c)
        with meter as cpu:
            timings, wall = await closed_loop(engines[side], reqs, c, chunk_work_s)
    done = [t for t in timings if t.end is not None]
    tokens = sum(t.tokens for t in done)
    tpot = [(t.end - t.first) / (t.tokens - 1) for t in done if t.tokens > 1]
    row = {"side": side, "c": c, "requests": len(reqs), "completed": len(done), "tok_s": tokens / wall,
           "ttft_ms": 1e3 * statistics.median(t.first - t.start for t in done),
           "tpot_ms": 1e3 * statistics.median(tpot) if tpot else float("nan"),
           "cpu_parent": cpu.parent, "cpu_loop": cpu.loop, "cpu_child": cpu.child, "cpu_scheduler": cpu.scheduler}
    log(f"{side} c={c}: {row['tok_s']:.1f} tok/s, ttft {row['ttft_ms']:.0f} ms, tpot {row['tpot_ms']:.1f} ms, "
        f"cores parent {cpu.parent:.2f} (loop {cpu.loop:.2f}) child {cpu.child:.2f} scheduler {cpu.scheduler:.2f}")
    return row


# ---- the run -------------------------------------------------------------------------------------------

def requests_for(args, c: int) -> list[GenerationRequest]:
    if args.mixed:
        lo, hi = (int(x) for x in args.mixed_tokens.split("-"))
        wl = bench.mixed_workload(output_tokens=(lo, hi), input_tokens=args.input_tokens)
    else:
        wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens, ignore_eos=True)
    lw = level_workload(wl, c, args.min_requests, args.per_user)
    return [GenerationRequest(prompt=p, max_tokens=n, ignore_eos=lw.ignore_eos) for p, _, n in lw.items()]


async def run(args) -> list[dict]:
    """One side (`args.variants`) at one level, `args.rounds` times, in this process."""
    from llmserve_nb.engine import TransformersEngine

    side, [c] = args.variants, args.level_list
    cfg = EngineConfig(dtype=args.dtype, max_num_seqs=c)
    threads = int(side[1:]) if side[1:] else cpu_threads(cfg)
    cfg = cfg.model_copy(update={"torch_threads": threads})
    engines: dict = {}
    cores = []
    if side.startswith("A"):
        engines[side] = TransformersEngine(cfg)  # loads on its decode loop's thread, as a replica does
        model = engines[side].model
    elif side.startswith("B"):
        engines[side] = EngineCoreClient(cfg)
        cores.append(engines[side])
        model = None
    else:
        model = HFEngine(cfg)
    try:
        meter = CpuMeter(cores, [(os.getpid(), e.batcher.native_thread_id) for s, e in engines.items() if s[0] == "A"]
                         + [(c.proc.pid, c.info()["engine_core_scheduler_tid"]) for c in cores])
        reqs = requests_for(args, c)
        rows = []
        for _ in range(args.rounds):
            row = await measure(side, engines, model, reqs, c, meter, args.chunk_work_us / 1e6)
            rows.append({**row, "threads": threads})
        return rows
    finally:
        for engine in engines.values():
            engine.close()


def each_side_in_its_own_process(args) -> list[dict]:
    """Every side, level and round in a fresh process: torch gives each thread that runs parallel code an
    OpenMP pool of its own, and two pools in one process (say A's decode loop and C's main thread) make
    libgomp sleep between a step's parallel regions, which slows every side (benchmarks/README.md, round 5)."""
    rows = []
    passed = sys.argv[1:]
    for c in args.level_list:
        for r in range(args.rounds):
            for side in args.sides if r % 2 == 0 else args.sides[::-1]:
                cmd = [sys.executable, __file__, *passed, "--variants", side, "--levels", str(c), "--rounds", "1",
                       "--one-side"]
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                rows += [{**row, "round": r} for row in json.loads(out.splitlines()[-1])]
    return rows


def table(rows: list[dict], sides: list[str], levels: list[int]) -> str:
    """Means over rounds; a ratio's parentheses hold each round's (sides of one round ran back to back)."""
    out = ["| side | torch threads | c | tok/s | ÷ A | ÷ C | TTFT p50 ms | TPOT p50 ms | cores: parent | its event "
           "loop | core process | scheduler thread | total |", "|" + "---|" * 13]
    for c in levels:
        of = {side: [r for r in rows if r["side"] == side and r["c"] == c] for side in sides}
        for side, mine in of.items():
            mean = lambda k: statistics.mean(r[k] for r in mine)
            ratios = {o: [r["tok_s"] / x["tok_s"] for r, x in zip(mine, of[o])] for o in ("A", "C") if o in of}
            vs = {o: f"{statistics.mean(q):.2f} ({' '.join(f'{x:.2f}' for x in q)})" for o, q in ratios.items()}
            out.append(f"| {side} | {mine[0]['threads']} | {c} | {mean('tok_s'):.1f} | {vs.get('A', '-')} | "
                       f"{vs.get('C', '-')} | {mean('ttft_ms'):.0f} | {mean('tpot_ms'):.1f} | {mean('cpu_parent'):.2f}"
                       f" | {mean('cpu_loop'):.2f} | {mean('cpu_child'):.2f} | {mean('cpu_scheduler'):.2f} | "
                       f"{mean('cpu_parent') + mean('cpu_child'):.2f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="32,8")
    p.add_argument("--rounds", type=int, default=2, help="each side this many times per level, alternating order")
    p.add_argument("--variants", default="A,A1,B2,B1,C",
                   help="A[t]: the in-thread engine [with t torch threads]; B[t]: the core process; C: static batches")
    p.add_argument("--min-requests", type=int, default=16, help="requests per level: max(this, per-user x c)")
    p.add_argument("--per-user", type=int, default=1)
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64, help="fixed workload: tokens per request (ignore_eos)")
    p.add_argument("--mixed", action="store_true", help="max_tokens log-uniform over --mixed-tokens, EOS honoured")
    p.add_argument("--mixed-tokens", default="16-512")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-work-us", type=float, default=0.0, help="Python work on the event loop per stream output")
    p.add_argument("--one-side", action="store_true", help=argparse.SUPPRESS)  # run one side, print its rows
    args = p.parse_args()
    args.level_list = [int(x) for x in args.levels.split(",")]
    if args.one_side:
        print(json.dumps(asyncio.run(run(args))))
        return
    args.sides = args.variants.split(",")
    info = cpu_info()
    log(f"CPU {info['model']} x{info['cpus']}, flags {info['flags']}")
    rows = each_side_in_its_own_process(args)
    workload = (f"mixed max_tokens {args.mixed_tokens} EOS honoured" if args.mixed
                else f"fixed {args.max_tokens} tokens ignore_eos")
    print(f"\n{workload}, ~{args.input_tokens}-token prompts, {args.dtype}; CPU {info['model']} x{info['cpus']} "
          f"({info['flags']}); {args.chunk_work_us:.0f} us of event-loop work per stream output; B sends token "
          "ids per step, this process detokenizes\n")
    print(table(rows, args.variants.split(","), args.level_list))


if __name__ == "__main__":
    main()
