"""The engine core: a process of its own per replica that owns the model and the scheduler (vLLM's design).

`core_client.EngineCoreClient`, the replica's engine, starts it (`python -m llmserve_nb.engine.core`) and
talks to it over two pipes of pickled tuples. The model loads and decodes here, on `ContinuousBatcher`'s
thread, so the replica's event loop (HTTP, SSE, Serve's own Python) no longer shares a GIL with the decode
step; the front end tokenizes, detokenizes, applies stop strings and streams. Served on 2 cores against the
decode thread in the replica: 1.26x tok/s and 0.85x TTFT at one user, the same tok/s at 32
(benchmarks/README.md, "The served path, round 7").

What goes to the core: ("submit", [(request_id, prompt_ids, max_tokens, temperature, top_p, seed,
ignore_eos), ...]) one admission group, ("abort", request_id), ("configure", max_num_seqs), ("fault",
message), ("close",). What comes back: ("ready", info) or ("load_failed", why) once; then, where the
in-process engine hands its streams their text (after an admission, after a step), one ("step", ids,
tokens, finished, failed, stats) for all rows: each sampled id with its request's id, the rows that ended
for a reason the ids do not show (an abort), the rows that failed, and the scheduler's stats; finally
("dead", why) when the loop has ended.

The core ends a row on EOS and max_tokens, which ids alone decide; a stop string only the front end can
see, and it aborts the row here. The core exits when its front end's pipe closes: a replica that dies
takes its core with it.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine.protocol import EngineDeadError, FinishReason, GenerationRequest, GenerationResult

__all__ = ["error_kind", "serve"]

log = logging.getLogger("llmserve_nb.engine.core")

# A row's failure crosses the pipe as (kind, message); the front end raises the kind's error again.
ERRORS: dict[str, type[Exception]] = {"dead": EngineDeadError, "value": ValueError, "error": RuntimeError}


def error_kind(error: BaseException) -> tuple[str, str]:
    if isinstance(error, EngineDeadError):
        return "dead", str(error)
    if isinstance(error, ValueError):
        return "value", str(error)
    return "error", f"{type(error).__name__}: {error}"


class Channel:
    """The sending end of a pipe, for several threads (the scheduler's steps, the main thread's failed submits,
    the end's report)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)


class StepOutbox:
    """The batcher's outbox here: what its rows produced since the last flush, sent as one message. Only
    the scheduler thread puts and flushes (sampling, aborts and failures all happen on it)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.stats: Any = None  # () -> the scheduler's stats, set once the batcher exists
        self._clear()

    def _clear(self) -> None:
        self.ids: list[str] = []  # a row's id once per token it got
        self.tokens: list[int] = []
        self.finished: list[tuple[str, FinishReason]] = []
        self.failed: list[tuple[str, str, str]] = []

    def flush(self) -> None:
        if self.ids or self.finished or self.failed:
            message = ("step", self.ids, self.tokens, self.finished, self.failed, self.stats())
            self._clear()
            self.channel.send(message)


class TokenOutput:
    """`OutputText`'s part that ids alone decide (EOS, max_tokens), for the scheduler; every sampled id goes
    to the front end, whose `OutputText` makes the text and applies stop strings."""

    def __init__(self, request_id: str, request: GenerationRequest, prompt_tokens: int, eos_ids: set[int],
                 outbox: StepOutbox):
        self.request_id, self.request, self.prompt_tokens = request_id, request, prompt_tokens
        self._eos_ids, self._outbox = eos_ids, outbox
        self.count, self.done = 0, False
        self.finish_reason: FinishReason = "length"

    def push(self, token_id: int) -> str:
        self._outbox.ids.append(self.request_id)
        self._outbox.tokens.append(token_id)
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


def serve(inbox: Connection, outbox_conn: Connection, cfg: EngineConfig) -> int:
    """Load the model on the scheduler's thread, say so, then take the front end's messages until it closes
    the engine (exit code 0) or goes away."""
    from llmserve_nb.engine.hf import HFEngine, Row
    from llmserve_nb.engine.scheduler import ContinuousBatcher

    channel = Channel(outbox_conn)
    outbox = StepOutbox(channel)
    try:
        batcher = ContinuousBatcher(max_num_seqs=cfg.max_num_seqs, load=partial(HFEngine, cfg), outbox=outbox)
    except BaseException as e:
        log.exception("the engine core could not load its model")
        channel.send(("load_failed", f"{type(e).__name__}: {e}"))
        return 1
    model = batcher.engine

    def stats() -> dict[str, Any]:
        cache = model.prefix_cache
        return {**batcher.stats(), "prefix_cache": cache.stats() if cache is not None else {"enabled": False}}

    outbox.stats = stats
    channel.send(("ready", {"model": model.model_name, "max_model_len": model.max_model_len,
                            "eos_ids": sorted(model.eos_ids), "tokenizer_source": model.tokenizer_source,
                            "load_timings": model.load_timings, "stats": stats(),
                            "scheduler_thread": batcher.native_thread_id}))

    def report_end() -> None:
        batcher.join()
        channel.send(("dead", batcher.dead))

    reporter = threading.Thread(target=report_end, name="llm-core-end", daemon=True)
    reporter.start()

    def row(request_id: str, ids: list[int], request: GenerationRequest) -> Row:
        def fail(e: BaseException) -> None:
            outbox.failed.append((request_id, *error_kind(e)))

        return Row(TokenOutput(request_id, request, len(ids), model.eos_ids, outbox), ids, model.generator(request),
                   emit=lambda _: None, finish=lambda r: outbox.finished.append((request_id, r.finish_reason)),
                   fail=fail, request_id=request_id)

    while True:
        try:
            kind, *body = inbox.recv()
        except EOFError:  # the front end is gone (its replica died): nobody can use what we decode
            log.warning("the engine core's front end went away; exiting")
            return 0
        if kind == "submit":
            rows, failed = [], []
            for request_id, ids, max_tokens, temperature, top_p, seed, ignore_eos in body[0]:
                try:  # a request that cannot be set up fails alone, not its admission group
                    request = GenerationRequest(prompt="", max_tokens=max_tokens, temperature=temperature,
                                                top_p=top_p, seed=seed, ignore_eos=ignore_eos)
                    rows.append(row(request_id, ids, request))
                except Exception as e:
                    failed.append((request_id, *error_kind(e)))
            try:
                batcher.submit(rows)
            except EngineDeadError as e:
                failed += [(r.request_id, *error_kind(e)) for r in rows]
            if failed:
                channel.send(("step", [], [], [], failed, stats()))
        elif kind == "abort":
            batcher.abort(body[0])
        elif kind == "configure":
            batcher.max_num_seqs = body[0]
        elif kind == "fault":
            batcher.inject_fault(body[0])
        elif kind == "close":
            batcher.close()
            reporter.join()
            return 0


def main(argv: list[str]) -> None:
    inbox_fd, outbox_fd, cfg_json = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core[%(process)d] %(levelname)s %(message)s")
    code = serve(Connection(int(inbox_fd), writable=False), Connection(int(outbox_fd), readable=False),
                 EngineConfig.model_validate_json(cfg_json))
    # Without the interpreter's teardown: the scheduler thread is a daemon, and torch's exit is slow.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
