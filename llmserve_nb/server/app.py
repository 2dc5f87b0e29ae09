"""The Ray Serve application: an OpenAI-compatible LLM server with continuous batching.

One entry point, `build_app(args)`, is used by the Python deploy, `serve run`, the Serve REST API
and a RayService `serveConfigV2` alike. The deployment speaks HTTP (`openai_api` holds the wire
format) and drives the engine only through its protocol (`engine.protocol.Engine`, made by
`engine.create_engine`): prepare, submit, stream, abort, configure, check_health, stats, info, close.

Batching has two levels: `@serve.batch` forms admission groups (prefilled together; its
`max_batch_size` / `batch_wait_timeout_s` are the live `user_config`), and the engine merges each
group into its running decode loop between steps (continuous batching, up to
`engine.max_num_seqs` rows). A request returns, ends its stream and frees its
`max_ongoing_requests` slot the step it finishes; a client that goes away aborts its request.
"""

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from llmserve_nb.config import API_KEY_ENV, DEPLOYMENT_NAME, AppConfig, BatchingConfig, nest_dotted
from llmserve_nb.engine import create_engine
from llmserve_nb.engine.protocol import (
    Engine,
    EngineDeadError,
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    RequestOutput,
    RequestStream,
)
from llmserve_nb.server.autoscaling_policy import PRESSURE_METRIC
from llmserve_nb.server.metrics import RequestRecord, ServerMetrics
from llmserve_nb.server.openai_api import (
    CHAT_COMPLETION_MODEL,
    COMPLETION_MODEL,
    ERROR_RESPONSES,
    STREAM_RESPONSE,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    OpenAIError,
    chat_completion_body,
    completion_body,
    install_error_handling,
    sse_events,
)
from llmserve_nb.server.router import ForwardedRequest, ReplicaHeader, replay, routed
from llmserve_nb.stats import percentile

__all__ = ["LLMServer", "build_app"]

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="llmserve-nb",
    description="OpenAI-compatible LLM serving on Ray Serve, with continuous batching.",
    version="0.2.0",
)
install_error_handling(api)
api.add_middleware(ReplicaHeader)


async def _deadline(stream: RequestStream, timeout_s: float | None, request_id: str) -> AsyncIterator[RequestOutput]:
    """The stream's outputs, ending with a 504 once `timeout_s` has passed since the request started
    (the caller's `finally` then aborts the row)."""
    if timeout_s is None:
        async for out in stream:
            yield out
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            out = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise OpenAIError(504, f"request {request_id} timed out after {timeout_s:g} s (deployment.request_timeout_s);"
                              " it was stopped", type_="timeout_error") from None
        yield out


def _engine_gone(error: EngineDeadError) -> OpenAIError:
    return OpenAIError(503, f"the engine is not running, the replica is being replaced: {error}", type_="server_error")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class LLMServer:
    """One replica: an engine behind an admission queue and the OpenAI routes."""

    def __init__(self, config: dict[str, Any]):
        self.config = AppConfig.from_args(config)
        self.engine: Engine = create_engine(self.config.engine)
        # Prometheus metrics (vLLM's names) and this replica's /stats, from the same records.
        self.metrics = ServerMetrics(self.engine.model_name, engine_stats=self.engine.stats)
        self._records: dict[str, RequestRecord] = {}
        self._recent_ttft: deque[tuple[float, float]] = deque(maxlen=4096)  # (when, ttft) for autoscaling
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.api_key = os.environ.get(API_KEY_ENV) or None
        self.reconfigure(self.config.user_config())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on deploy and whenever user_config changes, without restarting the replica."""
        user_config = dict(user_config)
        self.request_timeout_s = user_config.pop("request_timeout_s", None)
        self.autoscaling_targets = user_config.pop("autoscaling_targets", None)
        batching = BatchingConfig.model_validate(user_config)
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        # max_batch_size=1 means batching off altogether: one sequence decoding at a time.
        self.engine.configure(max_num_seqs=1 if batching.max_batch_size == 1 else self.config.engine.max_num_seqs)
        self.batching = batching

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, after in-flight requests drained (or the graceful
        # shutdown timed out): the decode loop stops and whatever is still in flight fails fast. The
        # guard is for a constructor that failed before the engine existed.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
            log.info("replica stopping: the engine is closed")

    async def check_health(self) -> None:
        """Serve's periodic health check: fails when the engine's decode loop has died, so Serve
        replaces the replica instead of routing requests to an actor that can only answer errors."""
        self.engine.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve collects this for custom autoscaling policies (`AutoscalingConfig(policy="llm")`): this
        replica's pressure, waiting requests and recent TTFT against their targets (1.0 = on target)."""
        if not self.autoscaling_targets:
            return {}
        now = time.monotonic()
        while self._recent_ttft and now - self._recent_ttft[0][0] > 30.0:
            self._recent_ttft.popleft()
        ttft_p90 = percentile([t for _, t in self._recent_ttft], 90) if self._recent_ttft else 0.0
        targets = self.autoscaling_targets
        pressure = max(self.metrics.waiting / targets["waiting_requests"], ttft_p90 / targets["ttft_s"])
        return {PRESSURE_METRIC: pressure}

    def inject_engine_fault(self, message: str) -> None:
        """Fault injection for the reliability experiments (called in the replica through Serve's
        replica context): the engine's decode loop dies, as a bug in it would."""
        self.engine.inject_fault(message)

    # Admission groups: requests that arrive together are prefilled together. The batch returns as
    # soon as its requests are submitted; each request then follows its own stream.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=32)
    async def _admit(self, jobs: list[PreparedRequest]) -> list[RequestStream | BaseException]:
        self.metrics.admission_batch(self._records[j.request_id] for j in jobs if j.request_id in self._records)
        try:
            return self.engine.submit(jobs)
        except Exception as e:
            return [e] * len(jobs)

    # ---- one request's life ------------------------------------------------------------------
    def _check(self, request: Request, body: Any = None) -> None:
        if self.api_key:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                raise OpenAIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                  type_="authentication_error")
        if body is None:
            return
        if body.model and body.model != self.engine.model_name:
            raise OpenAIError(404, f"model '{body.model}' is not served here; this server serves "
                              f"'{self.engine.model_name}'", "model", "not_found_error")
        limit = self.config.engine.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise OpenAIError(400, f"max_tokens={body.max_tokens} exceeds this server's limit of {limit}", "max_tokens")

    async def _prepare(self, req: GenerationRequest) -> PreparedRequest:
        try:
            return await self.engine.prepare(req)
        except ValueError as e:
            raise OpenAIError(400, str(e), "prompt") from None
        except EngineDeadError as e:
            raise _engine_gone(e) from None

    async def _outputs(self, prepared: PreparedRequest, rec: RequestRecord, streamed: bool = False,
                       ) -> AsyncIterator[RequestOutput]:
        """The request's outputs. However it ends (done, failed, client gone, cancelled), an unfinished
        request is aborted in the engine, so no row decodes for nobody. A streamed request's record
        is finished here (its errors go out in-band, with HTTP 200 already sent)."""
        stream: RequestStream | None = None
        self._records[prepared.request_id] = rec  # for the admission batch's metrics
        try:
            admitted = await self._admit(prepared)
            if isinstance(admitted, BaseException):
                raise admitted
            stream = admitted
            async for out in _deadline(stream, self.request_timeout_s, prepared.request_id):
                if rec.first_token_at is None:
                    rec.first_token()
                    self._recent_ttft.append((time.monotonic(), rec.first_token_at - rec.started))
                if out.result is not None and streamed:
                    r = out.result
                    rec.finish(200, r.finish_reason, r.prompt_tokens, r.completion_tokens)
                yield out
        except EngineDeadError as e:
            err = _engine_gone(e)
            rec.finish(err.status, "error")
            raise err from None
        except OpenAIError as e:
            rec.finish(e.status, "error" if e.status >= 500 else None)
            raise
        except Exception as e:
            rec.finish(500, "error")
            raise OpenAIError(500, f"generation failed: {e}", type_="server_error") from None
        finally:
            self._records.pop(prepared.request_id, None)
            if stream is None or not stream.finished:
                self.engine.abort(prepared.request_id)

    async def _result(self, prepared: PreparedRequest, rec: RequestRecord) -> GenerationResult:
        outputs = self._outputs(prepared, rec)
        try:
            async for out in outputs:
                if out.result is not None:
                    return out.result
            raise OpenAIError(500, "generation ended without a result", type_="server_error")
        finally:
            await outputs.aclose()

    def _sse(self, prepared: PreparedRequest, rec: RequestRecord, kind: str, include_usage: bool) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            outputs = self._outputs(prepared, rec, streamed=True)
            try:
                with rec:  # a client that goes away finishes the record as an abort
                    async for line in sse_events(kind, self.engine.model_name, include_usage, outputs):  # type: ignore[arg-type]
                        yield line
            finally:
                # Runs when the client disconnects too; closing the outputs aborts the request.
                await outputs.aclose()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _done(rec: RequestRecord, results: list[GenerationResult]) -> None:
        reasons = {r.finish_reason for r in results}
        reason = "abort" if "abort" in reasons else "length" if reasons == {"length"} else "stop"
        rec.finish(200, reason, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))

    # ---- routes ------------------------------------------------------------------------------
    @api.post("/v1/chat/completions", summary="OpenAI chat completions (streaming with stream=true)",
              response_model=CHAT_COMPLETION_MODEL, responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        with self.metrics.request("/v1/chat/completions") as rec:
            self._check(request, body)
            messages = [m.model_dump() for m in body.messages]
            prepared = await self._prepare(body.engine_request(256, messages=messages))
            if body.stream:
                return self._sse(prepared, rec, "chat", body.include_usage)
            result = await self._result(prepared, rec)
            self._done(rec, [result])
            return chat_completion_body(self.engine.model_name, result)

    @api.post("/v1/completions", summary="OpenAI text completions (streaming with stream=true)",
              response_model=COMPLETION_MODEL, responses={**STREAM_RESPONSE, **ERROR_RESPONSES})
    async def completions(self, body: CompletionRequest, request: Request):
        with self.metrics.request("/v1/completions") as rec:
            self._check(request, body)
            if body.echo:
                raise OpenAIError(400, "echo is not supported", "echo")
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if body.stream and len(prompts) > 1:
                raise OpenAIError(400, "streaming takes a single prompt, not a list", "prompt")
            prepared = [await self._prepare(body.engine_request(16, prompt=p)) for p in prompts]
            if body.stream:
                return self._sse(prepared[0], rec, "completion", body.include_usage)
            results = list(await asyncio.gather(*(self._result(p, rec) for p in prepared)))
            self._done(rec, results)
            return completion_body(self.engine.model_name, results)

    @api.post("/generate", response_model=GenerateResponse, summary="Plain text generation (greedy)",
              responses=ERROR_RESPONSES)
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        with self.metrics.request("/generate") as rec:
            self._check(request)
            prepared = await self._prepare(GenerationRequest(prompt=body.prompt, max_tokens=body.max_new_tokens))
            result = await self._result(prepared, rec)
            self._done(rec, [result])
            return GenerateResponse(generated_text=result.text)

    @api.get("/v1/models", summary="The served model", responses={401: ERROR_RESPONSES[401]})
    async def models(self, request: Request):
        self._check(request)
        return {"object": "list", "data": [{"id": self.engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "llmserve-nb"}]}

    @api.get("/health", summary="Readiness: the model is loaded and the engine's decode loop runs",
             responses={503: ERROR_RESPONSES[503]})
    async def health(self):
        try:
            self.engine.check_health()
        except EngineDeadError as e:
            return JSONResponse(status_code=503, content=OpenAIError(503, str(e), type_="server_error").body())
        return {"status": "ok", "model": self.engine.model_name}

    async def forward(self, *routing_key: Any, request: ForwardedRequest) -> AsyncIterator[list[dict[str, Any]]]:
        """LLMIngress's call when the router reads the prompt (`routing_key`, there for the router only): the
        request through this replica's own routes, its ASGI messages streamed back."""
        async for messages in replay(self.app, request):
            yield messages

    @api.get("/stats", summary="This replica's batching statistics, scheduler state and settings")
    async def replica_stats(self):
        return {
            "replica": self.replica_id,
            "model": self.engine.model_name,
            "batching": self.batching.model_dump(),
            "engine": self.engine.info(),
            **self.engine.stats(),
            **self.metrics.as_stats(),
            # Requests that arrived and are not finished, as the Prometheus gauges read them.
            "requests_running": self.metrics.running,
            "requests_waiting": self.metrics.waiting,
        }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The one entry point: Python deploy, `serve run`, the REST API and RayService all call this."""
    config = AppConfig.from_args(nest_dotted(args or {}))
    return routed(config, LLMServer)
