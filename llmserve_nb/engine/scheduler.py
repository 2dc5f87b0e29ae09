"""Continuous batching for the transformers engine, and the engine protocol on top of it.

One thread owns the model. Between decode steps it admits new requests (one prefill per admission
group, merged into the running batch), applies aborts, and steps every running row; each row
leaves the batch, and its stream ends, the step it finishes. What a step streams (every row's new
text, results and failures) goes to the event loop in one hand-off (`StreamOutbox`). Failures are isolated: a failed
prefill fails only its admission group, a row whose sampling fails only that row; a failed
forward pass of the running batch fails the rows it carried (it cannot blame one), and the loop
goes on serving. The loop ends only when the engine is closed, or on a bug in the loop itself (or
an injected fault): then every request in flight fails with EngineDeadError, and so does every
later submit.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Sequence

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine.hf import DecodeBatch, HFEngine, Row
from llmserve_nb.engine.prompts import prepare_on
from llmserve_nb.engine.protocol import (
    ENGINE_CLOSED,
    EngineDeadError,
    GenerationRequest,
    PreparedRequest,
    RequestStream,
    StreamOutbox,
)

__all__ = ["ContinuousBatcher", "TransformersEngine"]

log = logging.getLogger(__name__)

# Aborts of requests the scheduler does not hold are kept for a later submit of the same id (a client
# that left while its request waited for its admission batch). Aborts of requests that already
# finished land there too and are never claimed: the oldest are forgotten past this many.
EARLY_ABORTS_KEPT = 1024


class _Closing(Exception):
    """Ends the scheduler loop from inside: `close()` was called."""


class ContinuousBatcher:
    """The scheduler thread: admission groups join the running decode loop between steps. Rows whose
    callbacks put into `outbox` reach their streams when the loop flushes it: after admission and
    aborts (first tokens without waiting for a step), after each step, and when the loop ends."""

    def __init__(self, engine: HFEngine | None = None, max_num_seqs: int = 64,
                 load: Callable[[], HFEngine] | None = None, outbox: Any = None):
        """`engine`, or `load` to build it on the loop's own thread (the constructor waits for it and raises
        what the load raised). Build it there where you can: OpenMP gives every thread that runs parallel
        torch code a pool of its own, and with a second pool on the cores (the loading thread's) libgomp stops
        spinning between the ~2000 parallel regions of a step and sleeps instead; a step took 1.4-1.6x as long
        (benchmarks/README.md, "The served path, round 5"). `outbox` is where the rows' callbacks put and what
        the loop flushes (anything with `flush()`); a `StreamOutbox` unless given (the engine core sends instead)."""
        if (engine is None) == (load is None):
            raise ValueError("give the batcher either an engine or a function that loads one")
        self.outbox = outbox if outbox is not None else StreamOutbox()
        self.max_num_seqs = max_num_seqs
        self._pending: deque[list[Row]] = deque()
        self._aborts: set[str] = set()
        self._early_aborts: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._running: DecodeBatch | None = None
        self._fault: str | None = None
        self._closing = False
        self.steps = 0
        self.running_max = 0
        self.aborted = 0
        self.width_max = 0
        self.dead: str | None = None  # why the loop ended; None while it runs
        loaded: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(engine, load, loaded), name="llm-continuous-batcher",
                                        daemon=True)
        self._thread.start()
        loaded.result()  # the thread has set self.engine, or this raises what its load raised

    # ---- any thread ----------------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        """Queue one admission group (prefilled together)."""
        if not rows:
            return
        with self._cond:
            if self.dead is not None or self._closing:
                raise EngineDeadError(self.dead or ENGINE_CLOSED)
            aborted_early = {r.request_id for r in rows if r.request_id in self._early_aborts}
            for request_id in aborted_early:
                del self._early_aborts[request_id]
            self._aborts |= aborted_early  # the next iteration takes them out of the queue unprefilled
            self._pending.append(rows)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def inject_fault(self, message: str) -> None:
        with self._cond:
            self._fault = message
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """End the loop after its current step and wait for the thread; requests in flight fail."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the continuous batcher did not stop within %.0f s", timeout_s)

    @property
    def native_thread_id(self) -> int | None:
        """The scheduler thread's id as the OS knows it (psutil, py-spy, top -H)."""
        return self._thread.native_id

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until the loop has ended (closed or died) and its requests have failed."""
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            batch = self._running
            running = len(batch.rows) if batch is not None else 0
            waiting = sum(len(g) for g in self._pending)
            width = batch.width if batch is not None and running else 0
        capacity = self.max_num_seqs * self.engine.max_model_len
        return {
            "num_requests_running": running,
            "num_requests_waiting": waiting,
            # KV positions held (rows x width, padding included) against the most the scheduler admits.
            "kv_cache_tokens": running * width,
            "kv_cache_usage_perc": round(running * width / capacity, 6) if capacity else 0.0,
            "kv_cache_width": width,
            "kv_cache_width_max": self.width_max,
            "decode_steps": self.steps,
            "running_max": self.running_max,
            "aborted": self.aborted,
            "max_num_seqs": self.max_num_seqs,
        }

    # ---- the scheduler thread ------------------------------------------------------------------
    def _take(self) -> tuple[list[list[Row]], set[str]]:
        with self._cond:
            while (not self._pending and self._running is None and not self._aborts
                   and self._fault is None and not self._closing):
                self._cond.wait()
            if self._fault is not None:
                raise RuntimeError(self._fault)
            if self._closing:
                raise _Closing()
            aborts, self._aborts = self._aborts, set()
            if aborts:
                held = {r.request_id for g in self._pending for r in g}
                held |= {r.request_id for r in self._running.rows} if self._running else set()
                self._keep_early_aborts(aborts - held)
                for group in self._pending:
                    self._abort_rows([r for r in group if r.request_id in aborts])
                    group[:] = [r for r in group if r.request_id not in aborts]
                while self._pending and not self._pending[0]:
                    self._pending.popleft()
            running = len(self._running.rows) if self._running else 0
            if self._running is not None and not self.engine.can_merge(self._running):
                return [], aborts
            taken: list[list[Row]] = []
            while self._pending and (
                (not taken and not running)
                or running + sum(map(len, taken)) + len(self._pending[0]) <= self.max_num_seqs
            ):
                group = self._pending.popleft()
                if group:
                    taken.append(group)
            return taken, aborts

    def _keep_early_aborts(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self._early_aborts[request_id] = None
        while len(self._early_aborts) > EARLY_ABORTS_KEPT:
            self._early_aborts.popitem(last=False)

    def _abort_rows(self, rows: list[Row]) -> None:
        for row in rows:
            delta = row.out.abort()
            if delta:
                row.emit(delta)
            row.finish(row.out.result())
            self.aborted += 1

    def _prefill(self, groups: list[list[Row]]) -> list[DecodeBatch]:
        """One prefill for all admitted groups; if it fails, each group alone, failing only those that
        fail again (one bad request must not fail its unrelated neighbours)."""
        try:
            return [self.engine.prefill([r for g in groups for r in g])]
        except Exception as e:
            if len(groups) == 1:
                log.exception("prefill of %d request(s) failed", len(groups[0]))
                for row in groups[0]:
                    row.fail(e)
                return []
        return [b for g in groups for b in self._prefill([g])]

    def _iteration(self) -> None:
        import torch

        taken, aborts = self._take()
        with torch.inference_mode():
            batch = self._running
            if aborts and batch is not None:
                gone = [i for i, r in enumerate(batch.rows) if r.request_id in aborts]
                if gone:
                    self._abort_rows([batch.rows[i] for i in gone])
                    self.engine.drop(batch, gone)
            for new in self._prefill(taken) if taken else []:
                if new.rows:
                    batch = new if batch is None or not batch.rows else self.engine.merge(batch, new)
            if taken or aborts:
                self.outbox.flush()
            if batch is not None and batch.rows:
                self.running_max = max(self.running_max, len(batch.rows))
                self.width_max = max(self.width_max, batch.width + 1)  # the step adds a column
                try:
                    self.engine.step(batch)
                except Exception as e:
                    log.exception("decode step of %d row(s) failed", len(batch.rows))
                    for row in batch.rows:
                        row.fail(e)
                    batch = None
                self.steps += 1
                self.outbox.flush()
            with self._cond:
                self._running = batch if batch is not None and batch.rows else None

    def _run(self, engine: HFEngine | None, load: Callable[[], HFEngine] | None, loaded: Future) -> None:
        try:
            self.engine = engine if engine is not None else load()
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result(None)
        self._loop()

    def _loop(self) -> None:
        try:
            while True:
                self._iteration()
        except _Closing:
            log.info("the continuous batcher stopped: the engine was closed")
            reason = ENGINE_CLOSED
        except BaseException as e:  # a bug in the loop itself: fail everything, let the health check report it
            log.exception("the continuous batcher died")
            reason = f"the engine's decode loop died: {e!r}"
        with self._cond:
            self.dead = reason
            rows = [r for g in self._pending for r in g] + (self._running.rows if self._running else [])
            self._pending.clear()
            self._running = None
        for row in rows:
            row.fail(EngineDeadError(reason))
        self.outbox.flush()


class TransformersEngine:
    """The `Engine` protocol for the transformers model: tokenization on a worker thread, loading and
    generation on the scheduler thread, streams consumed on the caller's event loop."""

    def __init__(self, cfg: EngineConfig | None = None, model: HFEngine | None = None):
        self.cfg = cfg or EngineConfig()
        # Loaded on the decode loop's thread, so that the replica's torch code runs on one OpenMP pool.
        self.batcher = ContinuousBatcher(model, max_num_seqs=self.cfg.max_num_seqs,
                                         load=None if model is not None else partial(HFEngine, self.cfg))
        self.model = self.batcher.engine
        self.model_name = self.model.model_name
        self.max_model_len = self.model.max_model_len
        # One worker: the fast tokenizer is not safe to call from several threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="llm-tokenize")

    async def prepare(self, request: GenerationRequest, request_id: str | None = None) -> PreparedRequest:
        self.check_health()
        return await prepare_on(self._tokenizer_thread, self.model.prompt_ids, request, request_id)

    def submit(self, prepared: Sequence[PreparedRequest]) -> list[RequestStream]:
        self.check_health()
        streams = [RequestStream(p.request_id) for p in prepared]
        rows = []
        for p, s in zip(prepared, streams):
            try:  # a request that cannot be set up fails alone, not its admission group
                put = partial(self.batcher.outbox.put, s)
                rows.append(Row(self.model.new_output(p.request, len(p.prompt_ids)), p.prompt_ids,
                                self.model.generator(p.request), emit=put, finish=put, fail=put,
                                request_id=p.request_id))
            except Exception as e:
                s.fail(e)
        self.batcher.submit(rows)
        return streams

    def abort(self, request_id: str) -> None:
        self.batcher.abort(request_id)

    def configure(self, *, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.batcher.max_num_seqs = max_num_seqs

    def check_health(self) -> None:
        if not self.batcher.alive:
            raise EngineDeadError(self.batcher.dead or "the engine's decode loop is not running")

    def stats(self) -> dict[str, Any]:
        cache = self.model.prefix_cache
        return {**self.batcher.stats(), "prefix_cache": cache.stats() if cache is not None else {"enabled": False}}

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len, **self.model.load_timings}

    def inject_fault(self, message: str) -> None:
        self.batcher.inject_fault(message)

    def close(self) -> None:
        self.batcher.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
