"""The OpenAI wire format, kept apart from the deployment and the engine: request schemas, response
bodies, SSE framing and error mapping. Response shapes are the `openai` package's own types, so the
OpenAPI document describes exactly what clients receive."""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve_nb.engine.protocol import GenerationRequest, GenerationResult, RequestOutput

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "ERROR_RESPONSES",
    "GenerateRequest",
    "GenerateResponse",
    "OpenAIError",
    "STREAM_RESPONSE",
    "chat_completion_body",
    "completion_body",
    "install_error_handling",
    "sse_events",
]


# ---- requests (the OpenAI subset served) -----------------------------------------------------
class _SamplingParams(BaseModel):
    # Unknown OpenAI fields are accepted (clients send e.g. `user`); unsupported *values* are rejected below.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="Default 16 for completions, 256 for chat.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seeds this request's sampler (64-bit).")
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

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def engine_request(self, default_max: int, **text: Any) -> GenerationRequest:
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
    prompt: Union[str, list[str]] = Field(
        description="Text, or a list of texts (not streamed). Empty text is refused with 400: there is no "
        "token to continue from."
    )
    echo: bool = Field(False, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt list is empty")
        if any(not p for p in prompts):
            raise ValueError("prompt must not be empty")
        return v


class GenerateRequest(BaseModel):
    """The original minimal route: text in, text out."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=256)


class GenerateResponse(BaseModel):
    generated_text: str


# ---- errors ------------------------------------------------------------------------------------
class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid JSON, an invalid field, or a prompt too long or empty."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server has one)."},
    404: {"model": ErrorResponse, "description": "Another model name than the one served."},
    500: {"model": ErrorResponse, "description": "Generation failed for this request."},
    503: {"model": ErrorResponse, "description": "Overloaded (with Retry-After), or the engine is not running and "
          "the replica is being replaced."},
    504: {"model": ErrorResponse, "description": "The request ran past deployment.request_timeout_s and was stopped."},
}
# Routes that stream when `stream: true`: the 200 answer is JSON or an SSE stream.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    # OpenAPI 3.1: an event-stream schema describes one event; each of ours is a `data:` line.
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}},
          "description": "JSON, or with stream=true server-sent events ending in `data: [DONE]`."},
}


def install_error_handling(api: FastAPI) -> None:
    """OpenAI-shaped errors everywhere: 400 (not FastAPI's 422) with one readable message, and an OpenAPI
    document that lists the statuses the app really returns."""

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "body")
            if err["type"] == "json_invalid":
                parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            elif not loc:
                parts.append("request body must be a JSON object (sent with Content-Type: application/json)")
            else:
                parts.append(f"{loc}: {err['msg']}")
        first_param = next(
            (".".join(str(x) for x in e["loc"] if x != "body") for e in exc.errors() if e["type"] != "json_invalid"), None
        )
        return JSONResponse(status_code=400, content=OpenAIError(400, "; ".join(parts), first_param or None).body())

    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.body())

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # e.g. a body that cannot be parsed at all: Starlette's {"detail"} would break the error shape.
        err = OpenAIError(exc.status_code, str(exc.detail), type_="invalid_request_error" if exc.status_code < 500 else "server_error")
        return JSONResponse(status_code=exc.status_code, content=err.body(), headers=getattr(exc, "headers", None))

    default_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = default_openapi()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


# ---- responses ---------------------------------------------------------------------------------
def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(result: GenerationResult) -> str:
    # "abort" happens only when the client has gone; OpenAI's schema has no such value.
    return "stop" if result.finish_reason == "abort" else result.finish_reason


def chat_completion_body(model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": _finish_reason(result), "logprobs": None}],
        "usage": _usage([result]),
    }


def completion_body(model: str, results: list[GenerationResult]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": r.text, "finish_reason": _finish_reason(r), "logprobs": None}
                    for i, r in enumerate(results)],
        "usage": _usage(results),
    }


# Response models for the OpenAPI document (the bodies above conform to them).
CHAT_COMPLETION_MODEL = ChatCompletion
COMPLETION_MODEL = Completion


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def sse_events(
    kind: Literal["chat", "completion"],
    model: str,
    include_usage: bool,
    outputs: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    """The SSE body of a streamed completion: a chunk per output (text that queued up meanwhile goes out
    as one chunk), the finish reason, optional usage, then `data: [DONE]`. A failure after the headers
    went out is reported in-band, as OpenAI's API does."""
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choice: dict | None, usage: dict | None = None) -> str:
        data: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                "choices": [choice] if choice else []}
        if usage is not None:
            data["usage"] = usage
        return _sse(data)

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    try:
        if kind == "chat":
            yield chunk(choice(None, None, role=True))
        async for out in outputs:
            if out.text:
                yield chunk(choice(out.text, None))
            if out.result is not None:
                yield chunk(choice(None, _finish_reason(out.result)))
                if include_usage:
                    yield chunk(None, _usage([out.result]))
    except OpenAIError as e:
        yield _sse({"error": {"message": e.message, "type": e.type, "code": e.status}})
    yield _sse("[DONE]")
