"""The `Engine` protocol in front of an engine-core process (`core`): the replica's side of vLLM's design.

The core owns the model and the scheduler. Here, on the replica's side: tokenization (on a worker thread,
as `TransformersEngine` does), and a reader thread that turns each step's token ids into text with
`OutputText` (stop strings included), hands every stream its part in one `StreamOutbox` flush, and keeps
the scheduler's stats from the same message, so `stats()` never waits on the core. The reader sees the
core exit as the end of its pipe: every request in flight fails with EngineDeadError, and so does the
health check.

Nothing in a send path holds the lock that the reader takes, and the reader never sends (a stop string's
abort goes through the stream's event loop): a core blocked writing to a full pipe can always be drained.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Sequence

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine.core import ERRORS
from llmserve_nb.engine.detokenizer import OutputText
from llmserve_nb.engine.loading import cpu_threads, ready_source
from llmserve_nb.engine.prompts import Prompts, load_tokenizer, prepare_on
from llmserve_nb.engine.protocol import (
    ENGINE_CLOSED,
    EngineDeadError,
    GenerationRequest,
    PreparedRequest,
    RequestStream,
    StreamOutbox,
)

__all__ = ["EngineCoreClient"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0


class EngineCoreClient:
    """The transformers engine with its model and scheduler in a child process (`engine.core`), made by
    `create_engine` for `EngineConfig(engine_core="process")`."""

    def __init__(self, cfg: EngineConfig | None = None):
        t0 = time.perf_counter()
        # The core is not a Ray worker, so it cannot see this replica's CPU allotment: it is given the count.
        self.cfg = cfg = cfg or EngineConfig()
        core_cfg = cfg.model_copy(update={"torch_threads": cpu_threads(cfg)})
        to_core_r, to_core_w = os.pipe()
        from_core_r, from_core_w = os.pipe()
        # Ray's runtime_env may have put the package on sys.path only; the core must import it too.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmserve_nb.engine.core", str(to_core_r), str(from_core_w),
                 core_cfg.model_dump_json()],
                pass_fds=(to_core_r, from_core_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(to_core_r)  # the core holds these ends now: its exit is our EOF, ours its EOF
            os.close(from_core_w)
        self._to_core = Connection(to_core_w, readable=False)
        self._from_core = Connection(from_core_r, writable=False)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # _live, dead, _stats
        self._live: dict[str, tuple[OutputText, RequestStream]] = {}
        self.dead: str | None = None
        self._closed = False
        self._outbox = StreamOutbox()
        try:
            # The tokenizer loads here while the core imports and loads the model (two cores at once), where
            # its files are there to load before the core has converted anything.
            t_tok, source = time.perf_counter(), ready_source(cfg)
            tokenizer = source and load_tokenizer(source, cfg.trust_remote_code)
            t_tok = time.perf_counter() - t_tok
            info = self._wait_ready()
            if source != info["tokenizer_source"]:
                t_tok = time.perf_counter()
                tokenizer = load_tokenizer(info["tokenizer_source"], cfg.trust_remote_code)
                t_tok = time.perf_counter() - t_tok
        except BaseException:
            if self.proc.poll() is None:  # still loading, or loaded (and the tokenizer failed): it waits for us
                self.proc.kill()
            self.proc.wait()
            self._to_core.close()
            self._from_core.close()
            raise
        self.model_name = info["model"]
        self.max_model_len = info["max_model_len"]
        self.prompts = Prompts(tokenizer, self.model_name, self.max_model_len, set(info["eos_ids"]))
        self._stats: dict[str, Any] = info["stats"]
        self._info = {**info["load_timings"], "engine_core": "process", "engine_core_pid": self.proc.pid,
                      "engine_core_scheduler_tid": info["scheduler_thread"],
                      "tokenizer_load_s": t_tok, "engine_start_s": time.perf_counter() - t0}
        # One worker: the fast tokenizer is not safe to call from several threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="llm-tokenize")
        self._reader = threading.Thread(target=self._read, name="llm-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> dict[str, Any]:
        try:
            kind, body = self._from_core.recv()
        except EOFError:
            raise RuntimeError(f"the engine core exited with code {self.proc.wait()} before it was ready; "
                               "its log (stderr) says why") from None
        if kind != "ready":
            raise RuntimeError(f"the engine core could not load the model: {body}")
        return body

    # ---- the protocol ---------------------------------------------------------------------------
    async def prepare(self, request: GenerationRequest, request_id: str | None = None) -> PreparedRequest:
        self.check_health()
        return await prepare_on(self._tokenizer_thread, self.prompts.prompt_ids, request, request_id)

    def submit(self, prepared: Sequence[PreparedRequest]) -> list[RequestStream]:
        self.check_health()
        streams = [RequestStream(p.request_id) for p in prepared]
        rows = []
        with self._lock:
            if self.dead is not None:
                raise EngineDeadError(self.dead)
            for p, stream in zip(prepared, streams):
                try:  # a request that cannot be set up fails alone, not its admission group
                    self._live[p.request_id] = (self.prompts.new_output(p.request, len(p.prompt_ids)), stream)
                except Exception as e:
                    stream.fail(e)
                    continue
                r = p.request
                rows.append((p.request_id, p.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.seed, r.ignore_eos))
        if rows:
            self._send(("submit", rows))
        return streams

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def configure(self, *, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self._send(("configure", max_num_seqs))
        with self._lock:
            self._stats = {**self._stats, "max_num_seqs": max_num_seqs}

    def check_health(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self.proc.poll() is not None:
            raise EngineDeadError(self._exit_reason())

    def stats(self) -> dict[str, Any]:
        """The scheduler's stats as of its last step, with running and waiting counted here: a request
        submitted since then is waiting, one with its first token running."""
        with self._lock:
            running = sum(1 for out, _ in self._live.values() if out.ids)
            return {**self._stats, "num_requests_running": running, "num_requests_waiting": len(self._live) - running}

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "max_model_len": self.max_model_len, **self._info}

    def inject_fault(self, message: str) -> None:
        self._send(("fault", message))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send(("close",))
        self._stop_core()
        self._reader.join(CLOSE_TIMEOUT_S)
        self._died(ENGINE_CLOSED)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self._to_core.close()

    # ---- the pipes ------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._to_core.send(message)
        except OSError:  # the core is gone: the reader fails what was in flight, check_health says why
            log.debug("not sent to the dead engine core: %s", message[0])

    def _stop_core(self) -> None:
        try:
            self.proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the engine core did not stop within %.0f s; killing it", CLOSE_TIMEOUT_S)
            self.proc.kill()
            self.proc.wait()

    def _exit_reason(self) -> str:
        code = self.proc.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the engine core process (pid {self.proc.pid}) {how}"

    def _read(self) -> None:
        try:
            while True:
                kind, *body = self._from_core.recv()
                if kind == "step":
                    self._step(*body)
                elif kind == "dead":
                    self._died(body[0])
        except (EOFError, OSError):
            pass
        self._died(self._exit_reason())
        self._from_core.close()

    def _step(self, ids: list[str], tokens: list[int], finished: list, failed: list, stats: dict) -> None:
        stopped: list[tuple[RequestStream, str]] = []
        put = self._outbox.put
        with self._lock:
            self._stats = {**stats, "max_num_seqs": self._stats["max_num_seqs"]}
            for request_id, token in zip(ids, tokens):
                entry = self._live.get(request_id)
                if entry is None:
                    continue  # ended here already (a stop string); its abort is on the way to the core
                out, stream = entry
                delta = out.push(token)
                if delta:
                    put(stream, delta)
                if out.done:
                    put(stream, out.result())
                    del self._live[request_id]
                    if out.finish_reason == "stop" and (out.request.ignore_eos or token not in self.prompts.eos_ids):
                        stopped.append((stream, request_id))  # a stop string: the core cannot see it
            for request_id, reason in finished:  # the core ended a row its ids did not (an abort)
                if (entry := self._live.pop(request_id, None)) is not None:
                    out, stream = entry
                    if delta := out.end(reason):
                        put(stream, delta)
                    put(stream, out.result())
            for request_id, kind, message in failed:
                if (entry := self._live.pop(request_id, None)) is not None:
                    put(entry[1], ERRORS[kind](message))
        self._outbox.flush()
        for stream, request_id in stopped:
            try:
                stream._loop.call_soon_threadsafe(self.abort, request_id)
            except RuntimeError:  # that loop is closed; the row runs out at its max_tokens
                pass

    def _died(self, reason: str) -> None:
        with self._lock:
            if self.dead is None:
                self.dead = reason
                if reason != ENGINE_CLOSED:
                    log.error("the engine is dead: %s", reason)
            streams = [stream for _, stream in self._live.values()]
            self._live.clear()
        for stream in streams:
            self._outbox.put(stream, EngineDeadError(self.dead))
        self._outbox.flush()

