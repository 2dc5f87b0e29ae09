"""The decode loop on a thread of the replica against an engine-core process, measured side by side.

Today the scheduler thread (`ContinuousBatcher`) decodes in the replica's process and shares the GIL with
the event loop that streams. vLLM instead runs an engine core per replica: a process that owns the model
and the scheduler, takes submits and aborts over ZMQ and sends each step's new token ids for every row in
one message, while the front end detokenizes, applies stop strings and streams. This script measures:

- A: `TransformersEngine` in this process, as a replica runs it (prepare -> submit -> consume streams);
- B: a child process (this file with --core) owning `HFEngine` + `ContinuousBatcher`, fed msgpack over ZMQ
  (ipc); where A hands its streams their text (after admission and after each step) it sends one message
  with each row's new token ids and the rows that finished. This process tokenizes, detokenizes with
  `OutputText` (stop strings included: a row the front end stops is aborted in the core), and feeds the
  streams from its event loop;
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
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import msgpack
import psutil
import zmq.asyncio

from bench_common import cpu_info, level_workload, log
from llmserve_nb import bench
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import ContinuousBatcher, EngineDeadError, GenerationRequest, GenerationResult, HFEngine
from llmserve_nb.engine.hf import Row
from llmserve_nb.engine.loading import cpu_threads
from llmserve_nb.engine.protocol import PreparedRequest, RequestStream, new_request_id


# ---- the engine core (the child process) ---------------------------------------------------------

class StepMessage:
    """What one scheduler iteration produced, sent as one message: (ids, tokens, finished, failed).
    Touched only by the scheduler thread (sampling, aborts and failures all happen there)."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.ids, self.tokens = [], []  # a row's id once per token it got in this iteration
        self.finished, self.failed = [], []  # (request id, finish reason or error)

    def flush(self) -> None:
        if self.ids or self.finished or self.failed:
            self.sock.send(msgpack.packb(("step", self.ids, self.tokens, self.finished, self.failed)))
            self.ids, self.tokens, self.finished, self.failed = [], [], [], []


class TokenOutput:
    """`OutputText`'s interface for the core: it decides only what ids alone decide (EOS, max_tokens) and
    passes every sampled id on; the front end's `OutputText` makes the text and applies stop strings."""

    def __init__(self, request_id: str, request: GenerationRequest, prompt_tokens: int, eos_ids: set[int],
                 step: StepMessage):
        self.request_id, self.request, self.prompt_tokens = request_id, request, prompt_tokens
        self._eos_ids, self._step = eos_ids, step
        self.count, self.done, self.finish_reason = 0, False, "length"

    def push(self, token_id: int) -> str:
        self._step.ids.append(self.request_id)
        self._step.tokens.append(token_id)
        if token_id in self._eos_ids and not self.request.ignore_eos:
            self.done, self.finish_reason = True, "stop"
            return ""
        self.count += 1
        self.done = self.count >= self.request.max_tokens
        return ""

    def abort(self) -> str:
        self.done, self.finish_reason = True, "abort"
        return ""

    def result(self) -> GenerationResult:
        return GenerationResult("", self.prompt_tokens, self.count, self.finish_reason)


class PublishingBatcher(ContinuousBatcher):
    """The scheduler thread, unchanged, sending where it hands A's streams their text (its outbox's
    flushes: after admission, so first tokens need not wait for a step, and after each step), and at
    the latest when an iteration ends. The thread touches neither before the first submit."""

    def __init__(self, max_num_seqs: int, step: StepMessage, load):
        self.step = step
        super().__init__(max_num_seqs=max_num_seqs, load=load)
        self.outbox = step

    def _iteration(self) -> None:
        try:
            super()._iteration()
        finally:
            self.step.flush()


def core_main(args) -> None:
    cfg = EngineConfig(dtype=args.dtype, torch_threads=args.threads, max_num_seqs=args.max_num_seqs)
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(args.core_in)
    outbox.connect(args.core_out)
    step = StepMessage(outbox)
    batcher = PublishingBatcher(cfg.max_num_seqs, step, load=partial(HFEngine, cfg))  # on its own thread
    model = batcher.engine
    # The scheduler thread sends only after a submit, and none has come yet: the socket is still ours.
    outbox.send(msgpack.packb(("ready", batcher._thread.native_id)))
    while True:
        kind, *body = msgpack.unpackb(inbox.recv())
        if kind == "submit":
            rows = []
            for request_id, ids, max_tokens, temperature, top_p, seed, ignore_eos in body[0]:
                req = GenerationRequest(prompt="", max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                        seed=seed, ignore_eos=ignore_eos)
                rows.append(Row(TokenOutput(request_id, req, len(ids), model.eos_ids, step), ids,
                                model.generator(req), emit=lambda _: None, request_id=request_id,
                                finish=lambda res, rid=request_id: step.finished.append((rid, res.finish_reason)),
                                fail=lambda e, rid=request_id: step.failed.append((rid, repr(e)))))
            batcher.submit(rows)
        elif kind == "abort":
            batcher.abort(body[0])
        elif kind == "close":
            batcher.close()
            return


# ---- the front end of B (this process) -------------------------------------------------------------

class CoreClient:
    """prepare/submit/abort like `TransformersEngine`, against a core process: tokenizes and detokenizes
    here, on the event loop that consumes the streams."""

    def __init__(self, model: HFEngine, threads: int, args):
        self.model = model
        ctx, where = zmq.asyncio.Context.instance(), tempfile.mkdtemp(prefix="llm-core-")
        self._to_core, self._from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        core_in, core_out = f"ipc://{where}/in", f"ipc://{where}/out"
        self._to_core.bind(core_in)
        self._from_core.bind(core_out)
        self.proc = subprocess.Popen([sys.executable, __file__, "--core", "--threads", str(threads), "--dtype",
                                      args.dtype, "--max-num-seqs", str(max(args.level_list)), "--core-in", core_in,
                                      "--core-out", core_out])
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="llm-tokenize")
        self._live: dict[str, tuple] = {}  # request id -> (OutputText, RequestStream)
        self.dead: str | None = None
        self.scheduler_thread = 0  # the core's, as a native thread id

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def watch() -> None:
            self.proc.wait()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(self._died)

        self._ready = asyncio.ensure_future(self._from_core.recv())
        threading.Thread(target=watch, daemon=True).start()
        kind, self.scheduler_thread = msgpack.unpackb(await self._ready)
        assert kind == "ready", kind
        self._reader = asyncio.create_task(self._read())

    def _died(self) -> None:
        self.dead = f"the engine core exited with code {self.proc.returncode}"
        self._ready.cancel()  # start-up never completes
        for _, stream in self._live.values():
            stream._queue.put_nowait(EngineDeadError(self.dead))
        self._live.clear()

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenizer_thread, self.model.prompt_ids, request)
        return PreparedRequest(request, ids, new_request_id())

    def submit(self, prepared: list[PreparedRequest]) -> list[RequestStream]:
        if self.dead:
            raise EngineDeadError(self.dead)
        streams = []
        for p in prepared:
            streams.append(RequestStream(p.request_id))
            self._live[p.request_id] = (self.model.new_output(p.request, len(p.prompt_ids)), streams[-1])
        r = [(p.request_id, p.prompt_ids, p.request.max_tokens, p.request.temperature, p.request.top_p,
              p.request.seed, p.request.ignore_eos) for p in prepared]
        self._to_core.send(msgpack.packb(("submit", r)))
        return streams

    def abort(self, request_id: str) -> None:
        self._to_core.send(msgpack.packb(("abort", request_id)))

    async def _read(self) -> None:
        # Streams are fed from this loop directly (no call_soon_threadsafe: the producer is on the loop).
        while True:
            _, ids, tokens, finished, failed = msgpack.unpackb(await self._from_core.recv())
            for request_id, token in zip(ids, tokens):
                if request_id not in self._live:
                    continue  # stopped here already; its abort is on the way to the core
                out, stream = self._live[request_id]
                delta = out.push(token)
                if delta:
                    stream._queue.put_nowait(delta)
                if out.done:
                    stream._queue.put_nowait(out.result())
                    del self._live[request_id]
                    if out.finish_reason == "stop" and (out.request.ignore_eos or token not in self.model.eos_ids):
                        self.abort(request_id)  # a stop string: the core cannot see it
            for request_id, _ in finished:  # the core ended a row the text did not (an abort)
                if request_id in self._live:
                    out, stream = self._live.pop(request_id)
                    stream._queue.put_nowait(out.abort())  # the text it held back
                    stream._queue.put_nowait(out.result())
            for request_id, error in failed:
                if request_id in self._live:
                    self._live.pop(request_id)[1]._queue.put_nowait(RuntimeError(error))

    def close(self) -> None:
        if self.proc.poll() is None:
            self._to_core.send(msgpack.packb(("close",)))
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._tokenizer_thread.shutdown(wait=False)


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

    def __init__(self, cores: list[CoreClient], schedulers: list[tuple[int, int]]):
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
    else:
        # B's front end only tokenizes and detokenizes with its model: one thread, no OpenMP workers.
        model = HFEngine(cfg if side == "C" else cfg.model_copy(update={"torch_threads": 1}))
        if side.startswith("B"):
            engines[side] = CoreClient(model, threads, args)
            cores.append(engines[side])
    try:
        for core in cores:
            await core.start()
        meter = CpuMeter(cores, [(os.getpid(), e.batcher._thread.native_id) for s, e in engines.items() if s[0] == "A"]
                         + [(c.proc.pid, c.scheduler_thread) for c in cores])
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
    p.add_argument("--core", action="store_true", help=argparse.SUPPRESS)  # run as the engine core
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-num-seqs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--core-in", help=argparse.SUPPRESS)
    p.add_argument("--core-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.core:
        core_main(args)
        return
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
