"""The Ray Serve application: an OpenAI-compatible LLM server with dynamic batching.

One entry point, `build_app(args)`, is used by the Python deploy, `serve run`, the Serve REST API
and a RayService `serveConfigV2` alike. Requests from all routes (chat, completions, /generate,
streaming or not) share the same `@serve.batch` queue, so they batch with each other.

Batching has two levels: `@serve.batch` forms admission batches (prefilled together; its
`max_batch_size` / `batch_wait_timeout_s` are the live `user_config`), and the engine's
`ContinuousBatcher` merges each admission batch into the running decode loop between steps
(continuous batching, up to `engine.max_num_seqs` rows).
"""

import asyncio
import json
import logging
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig, BatchingConfig, nest_dotted
from llmserve_nb.engine import ContinuousBatcher, GenerationRequest, GenerationResult, load_engine

__all__ = ["API_KEY_ENV", "LLMServer", "build_app"]

log = logging.getLogger("ray.serve")

API_KEY_ENV = "LLMSERVE_NB_API_KEY"


# ---- request schemas (OpenAI subset) ---------------------------------------------------------
class _SamplingParams(BaseModel):
    # Unknown OpenAI fields are accepted (clients send e.g. `user`); unsupported *values* are rejected below.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="Default 16 for completions, 256 for chat.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = Field(False, description="vLLM-style extension: always generate max_tokens.")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; must be 0.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Not supported; must be 0.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def engine_request(self, default_max: int, **text) -> GenerationRequest:
        return GenerationRequest(
            max_tokens=self.max_tokens or default_max,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop or [],
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            **text,
        )


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_SamplingParams):
    prompt: Union[str, list[str]]
    echo: bool = Field(False, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v


class GenerateRequest(BaseModel):
    """The original minimal route: text in, text out."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=256)


class GenerateResponse(BaseModel):
    generated_text: str


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error_body(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": type_, "param": param, "code": status}}
    )


api = FastAPI(
    title="llmserve-nb",
    description="OpenAI-compatible LLM serving on Ray Serve, with dynamic batching.",
    version="0.1.0",
)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default is a 422 with a nested list; OpenAI clients expect a 400 with one readable message.
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if x != "body")
        if err["type"] == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
        elif not loc:
            parts.append("request body must be a JSON object (sent with Content-Type: application/json)")
        else:
            parts.append(f"{loc or 'body'}: {err['msg']}")
    first_param = next(
        (".".join(str(x) for x in e["loc"] if x != "body") for e in exc.errors() if e["type"] != "json_invalid"), None
    )
    return _error_body(400, "; ".join(parts), first_param or None)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return _error_body(exc.status, exc.message, exc.param, exc.type)


# ---- batching ----------------------------------------------------------------------------------
@dataclass
class _Job:
    request: GenerationRequest
    prompt_ids: list[int]
    queue: asyncio.Queue | None = None  # set for streaming requests
    enqueued: float = field(default_factory=time.perf_counter)


class _BatchStats:
    """Per-replica record of the batches actually formed, for notebooks and tests."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.requests = 0
        self.generated_tokens = 0
        self.queue_wait_s = 0.0

    def record(self, jobs: list[_Job], results: list[GenerationResult], started: float) -> None:
        self.sizes[len(jobs)] += 1
        self.requests += len(jobs)
        self.generated_tokens += sum(r.completion_tokens for r in results)
        self.queue_wait_s += sum(started - j.enqueued for j in jobs)

    def as_dict(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        return {
            "batches": batches,
            "requests": self.requests,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.sizes.items())},
            "max_batch_size_seen": max(self.sizes, default=0),
            "mean_batch_size": self.requests / batches if batches else 0.0,
            "generated_tokens": self.generated_tokens,
            "mean_queue_wait_s": round(self.queue_wait_s / self.requests, 4) if self.requests else 0.0,
        }


_END = object()  # end-of-stream marker pushed after the last delta of a streaming job


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class LLMServer:
    """One replica: a loaded engine behind a dynamic-batching queue."""

    def __init__(self, config: dict[str, Any]):
        self.config = AppConfig.from_args(config)
        self.engine = load_engine(self.config.engine)
        self.stats = _BatchStats()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.api_key = os.environ.get(API_KEY_ENV) or None
        # The batcher's thread owns the model; batches formed below join its running decode loop
        # between steps, so a request never waits for an unrelated batch to finish.
        self.batcher = ContinuousBatcher(self.engine, max_num_seqs=self.config.engine.max_num_seqs)
        self.reconfigure(self.config.batching.model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on deploy and whenever user_config changes, without restarting the replica."""
        batching = BatchingConfig.model_validate(user_config)
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        # max_batch_size=1 means batching off altogether: one sequence decoding at a time.
        self.batcher.max_num_seqs = 1 if batching.max_batch_size == 1 else self.config.engine.max_num_seqs
        self.batching = batching
        if batching.max_batch_size > self._max_ongoing_requests():
            log.warning(
                "max_batch_size %d exceeds max_ongoing_requests %d: batches cannot fill; raise it too",
                batching.max_batch_size,
                self._max_ongoing_requests(),
            )

    @staticmethod
    def _max_ongoing_requests() -> int:
        # What Serve enforces for this replica now, which user_config alone cannot change.
        return serve.get_replica_context()._deployment_config.max_ongoing_requests

    # Admission batches: requests that arrive together are prefilled together. Several may be in
    # flight at once (they merge into the running decode loop), hence max_concurrent_batches.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=32)
    async def _run_batch(self, jobs: list[_Job]) -> list[GenerationResult | Exception]:
        loop = asyncio.get_running_loop()

        def on_token(i: int, delta: str) -> None:
            q = jobs[i].queue
            if q is not None:
                loop.call_soon_threadsafe(q.put_nowait, delta)

        started = time.perf_counter()
        try:
            future = self.batcher.submit([j.request for j in jobs], on_token, [j.prompt_ids for j in jobs])
            results = await asyncio.wrap_future(future)
        except Exception as e:  # surfaces to every request of the batch, as a 500 with the cause
            log.exception("batch of %d failed", len(jobs))
            results = [e] * len(jobs)
        else:
            self.stats.record(jobs, results, started)
        for j in jobs:
            if j.queue is not None:
                # Scheduled after every on_token callback above, so it always arrives last.
                loop.call_soon_threadsafe(j.queue.put_nowait, _END)
        return results

    # ---- helpers -----------------------------------------------------------------------------
    def _check(self, request: Request, body: _SamplingParams | None) -> None:
        if self.api_key:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                raise OpenAIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", type_="authentication_error")
        if body is None:
            return
        if body.model and body.model != self.engine.model_name:
            raise OpenAIError(404, f"model '{body.model}' is not served here; this server serves '{self.engine.model_name}'", "model", "not_found_error")
        limit = self.config.engine.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise OpenAIError(400, f"max_tokens={body.max_tokens} exceeds this server's limit of {limit}", "max_tokens")

    def _job(self, req: GenerationRequest, streaming: bool) -> _Job:
        try:
            ids = self.engine.prompt_ids(req)  # tokenized once here, reused by the batcher
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None
        n_prompt = len(ids)
        if n_prompt + req.max_tokens > self.engine.max_model_len:
            raise OpenAIError(
                400,
                f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds the context length "
                f"({self.engine.max_model_len}); shorten the prompt or lower max_tokens",
                "max_tokens",
            )
        return _Job(req, ids, asyncio.Queue() if streaming else None)

    async def _generate(self, job: _Job) -> GenerationResult:
        result = await self._run_batch(job)
        if isinstance(result, Exception):
            raise OpenAIError(500, f"generation failed: {result}", type_="server_error")
        return result

    async def _deltas(self, job: _Job) -> AsyncIterator[str]:
        """Text deltas of a streaming job; deltas that queued up meanwhile go out as one SSE chunk."""
        task = asyncio.ensure_future(self._generate(job))
        assert job.queue is not None
        while True:
            item = await job.queue.get()
            parts = []
            while item is not _END:
                parts.append(item)
                if job.queue.empty():
                    break
                item = job.queue.get_nowait()
            if parts:
                yield "".join(parts)
            if item is _END:
                break
        job.result = await task  # type: ignore[attr-defined]

    @staticmethod
    def _usage(result: GenerationResult) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    def _sse(self, job: _Job, body: _SamplingParams, kind: str) -> StreamingResponse:
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choice: dict | None, usage: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": created, "model": self.engine.model_name,
                    "choices": [choice] if choice else []}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        async def events() -> AsyncIterator[str]:
            try:
                if kind == "chat":
                    yield chunk(choice(None, None, role=True))
                async for delta in self._deltas(job):
                    yield chunk(choice(delta, None))
                result: GenerationResult = job.result  # type: ignore[attr-defined]
                yield chunk(choice(None, result.finish_reason))
                if include_usage:
                    yield chunk(None, self._usage(result))
            except OpenAIError as e:
                # Headers are already sent: report the failure in-band, as OpenAI's API does.
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'code': e.status}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes ------------------------------------------------------------------------------
    @api.post("/v1/chat/completions", summary="OpenAI chat completions (streaming with stream=true)")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check(request, body)
        messages = [m.model_dump() for m in body.messages]
        job = self._job(body.engine_request(256, messages=messages), body.stream)
        if body.stream:
            return self._sse(job, body, "chat")
        result = await self._generate(job)
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.engine.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": self._usage(result),
        }

    @api.post("/v1/completions", summary="OpenAI text completions (streaming with stream=true)")
    async def completions(self, body: CompletionRequest, request: Request):
        self._check(request, body)
        if body.echo:
            raise OpenAIError(400, "echo is not supported", "echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) > 1:
            raise OpenAIError(400, "streaming takes a single prompt, not a list", "prompt")
        jobs = [self._job(body.engine_request(16, prompt=p), body.stream) for p in prompts]
        if body.stream:
            return self._sse(jobs[0], body, "completion")
        results = await asyncio.gather(*(self._generate(j) for j in jobs))
        usage = [self._usage(r) for r in results]
        return {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.engine.model_name,
            "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                        for i, r in enumerate(results)],
            "usage": {k: sum(u[k] for u in usage) for k in usage[0]},
        }

    @api.post("/generate", response_model=GenerateResponse, summary="Plain text generation (greedy)")
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        self._check(request, None)
        req = GenerationRequest(prompt=body.prompt, max_tokens=body.max_new_tokens)
        result = await self._generate(self._job(req, streaming=False))
        return GenerateResponse(generated_text=result.text)

    @api.get("/v1/models", summary="The served model")
    async def models(self, request: Request):
        self._check(request, None)
        return {"object": "list", "data": [{"id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "llmserve-nb"}]}

    @api.get("/health", summary="Liveness: the replica has its model loaded")
    async def health(self):
        return {"status": "ok", "model": self.engine.model_name}

    @api.get("/stats", summary="This replica's batching statistics and settings")
    async def replica_stats(self):
        return {
            "replica": self.replica_id,
            "model": self.engine.model_name,
            "batching": self.batching.model_dump(),
            "max_ongoing_requests": self._max_ongoing_requests(),
            "engine": self.engine.load_timings if hasattr(self.engine, "load_timings") else {},
            "decode_steps": self.batcher.steps,
            "running_max": self.batcher.running_max,
            **self.stats.as_dict(),
        }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The one entry point: Python deploy, `serve run`, the REST API and RayService all call this."""
    config = AppConfig.from_args(nest_dotted(args or {}))
    return LLMServer.options(**config.deployment_options()).bind(config.build_args())
