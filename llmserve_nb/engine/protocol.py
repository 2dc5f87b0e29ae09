"""The engine protocol: what the server may call, and nothing more.

Like vLLM's `AsyncLLM` and Ray Serve LLM's engine protocol, a request goes in and an async stream of
outputs comes back; the server never reaches into how an engine schedules or decodes. The
transformers engine implements it here; another engine plugs in without touching the server.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, Sequence, runtime_checkable

__all__ = [
    "ENGINE_CLOSED",
    "Engine",
    "EngineDeadError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "PreparedRequest",
    "RequestOutput",
    "RequestStream",
    "StreamOutbox",
    "new_request_id",
]

FinishReason = Literal["stop", "length", "abort"]

_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass
class GenerationRequest:
    """One request. Exactly one of `prompt` (raw text) or `messages` (chat, templated) is set."""

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class PreparedRequest:
    """A request checked and tokenized by the engine (`Engine.prepare`), ready to be submitted."""

    request: GenerationRequest
    prompt_ids: list[int]
    request_id: str = field(default_factory=new_request_id)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens; "abort": cancelled


@dataclass
class RequestOutput:
    """One item of a request's stream: new text, and on the last item the request's result."""

    text: str
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


class EngineDeadError(RuntimeError):
    """The engine's decode loop is gone; the replica must be replaced (its health check fails)."""


# Why an engine that was closed refuses work: its EngineDeadError's message, in either engine.
ENGINE_CLOSED = "the engine was closed (its replica is shutting down); it takes no more requests"


class RequestStream:
    """The consumer side of one request: an async iterator of `RequestOutput`s, ending with the one
    that carries the result. Created on the event loop that consumes it; another thread feeds it with
    `push_text`/`finish`/`fail` (one `call_soon_threadsafe` each) or, many streams at once, through a
    `StreamOutbox`. Text that arrived meanwhile is coalesced into one output."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self.result: GenerationResult | None = None
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    # -- producer side (any thread) --------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            return True
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            return False

    def push_text(self, text: str) -> bool:
        return self._put(text)

    def finish(self, result: GenerationResult) -> bool:
        return self._put(result)

    def fail(self, error: BaseException) -> bool:
        return self._put(error)

    # -- consumer side (its event loop) ----------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.result is not None

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.result is not None:
            raise StopAsyncIteration
        parts: list[str] = []
        item = await self._queue.get()
        while isinstance(item, str):
            parts.append(item)
            if self._queue.empty():
                return RequestOutput("".join(parts))
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        self.result = item
        return RequestOutput("".join(parts), item)

    async def collect(self) -> GenerationResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


class StreamOutbox:
    """What a producer thread has for many streams (text, a result or an error each), handed over in
    one `call_soon_threadsafe` per event loop per `flush`: the engine flushes once per decode step.
    Each hand-off wakes the event loop, whose Python then competes with the decode thread for the
    GIL; one per row per token was a large share of a step at batch 32."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[RequestStream, Any]] = []

    def put(self, stream: RequestStream, item: str | GenerationResult | BaseException) -> None:
        with self._lock:
            self._items.append((stream, item))

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for stream, item in items:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, delivery in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, delivery)
            except RuntimeError:  # that loop is closed: nobody is listening to its streams any more
                pass


def _deliver(delivery: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in delivery:
        stream._queue.put_nowait(item)


@runtime_checkable
class Engine(Protocol):
    """Everything the server uses of an engine. Implementations: `TransformersEngine` (made by
    `llmserve_nb.engine.create_engine`)."""

    model_name: str
    max_model_len: int

    async def prepare(self, request: GenerationRequest, request_id: str | None = None) -> PreparedRequest:
        """Check and tokenize a request off the event loop; ValueError says what is wrong with it,
        EngineDeadError that the engine cannot serve."""
        ...

    def submit(self, prepared: Sequence[PreparedRequest]) -> list[RequestStream]:
        """Start the requests, admitted together (one prefill); one stream each, in order. Call it on the
        event loop that consumes the streams. A request aborted before it was submitted ends at once
        with finish_reason "abort"."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away): it leaves the running batch within one step and its
        stream ends with finish_reason "abort". An abort that comes before its request's `submit`
        is kept (a bounded number of them) and honoured there; finished ids are ignored."""
        ...

    def configure(self, *, max_num_seqs: int) -> None:
        """Change what the engine runs at once, live: at most `max_num_seqs` sequences decode together
        (1 = one at a time). Rows already running finish; the limit applies to admissions."""
        ...

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve (its decode loop died, or it was closed)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Scheduler state: running and waiting requests, KV cache use, decode steps; under "prefix_cache"
        the prefix cache's use and hits, where the engine has one."""
        ...

    def info(self) -> dict[str, Any]:
        """What the engine is: model, context length, where and how it was loaded, and load timings."""
        ...

    def inject_fault(self, message: str) -> None:
        """Fault injection for tests and experiments: the decode loop dies on its next iteration as a
        bug inside it would (RuntimeError(message)); every request fails and `check_health` raises."""
        ...

    def close(self) -> None:
        """Stop the engine: its decode loop ends, requests in flight fail with EngineDeadError, and so do
        later calls. Idempotent."""
        ...
