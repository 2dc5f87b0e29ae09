"""The HTTP layer of the vLLM app: one pure ASGI middleware in front of whichever app Ray Serve LLM serves.

Ray Serve LLM answers HTTP in one of two places, and this layer sits in front of both
(`llmserve_nb.server.vllm_ingress` installs it):
- by default, Ray's `OpenAiIngress` replica (our subclass of it), which calls `LLMServer` through a handle;
- with `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`, vLLM's own FastAPI app inside the `LLMServer` replica,
  with no ingress replica at all (Ray refuses a custom ingress class then, so the layer goes on the server).

What it adds, the same in both places:
- the project's API key (`Authorization: Bearer <key>`), checked before routing or body parsing; a wrong or
  missing key gets a 401 with an OpenAI-shaped error whose message contains "invalid or missing API key".
  `/health`, the API docs and CORS preflights stay open. Every other path is closed, including the
  routes of vLLM's app that the OpenAI ingress does not have (fail closed).
- `GET /health`: `{"status": "ok", "models": [...]}`, the transformers app's probe path.
- `POST /generate`: the transformers app's plain route (`{"prompt", "max_new_tokens"}` ->
  `{"generated_text"}`, greedy), answered by the app's own `/v1/completions` route in the same process,
  so it is served exactly like a completion (admission, metrics, the engine) and errors keep their shape.

Ray-free on purpose (Starlette and pydantic only): the unit tests run it without Ray or vLLM.
"""
from __future__ import annotations

import json
import secrets
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["AUTH_ERROR", "OPEN_PATHS", "GenerateRequest", "GenerateResponse", "VllmHttpLayer", "install"]

AUTH_ERROR = "invalid or missing API key (send 'Authorization: Bearer <key>')"
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
COMPLETIONS_PATH = "/v1/completions"


class GenerateRequest(BaseModel):
    """The transformers app's `/generate` body (`llmserve_nb.server.openai_api.GenerateRequest`, which pulls in
    the transformers engine and so is not imported here; a test keeps the two schemas equal)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=256)


class GenerateResponse(BaseModel):
    generated_text: str


def authorized(header: Optional[str], key: str) -> bool:
    return header is not None and secrets.compare_digest(header.encode(), f"Bearer {key}".encode())


def error_body(status: int, message: str, type_: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _validation_error(err: ValidationError) -> dict[str, Any]:
    """The transformers app's 400 for a bad body (openai_api.install_error_handling): one readable message."""
    parts, first_param = [], None
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "json_invalid":
            parts.append(f"request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
            continue
        first_param = first_param or loc or None
        parts.append(f"{loc}: {e['msg']}" if loc else
                     "request body must be a JSON object (sent with Content-Type: application/json)")
    return error_body(400, "; ".join(parts), "invalid_request_error", first_param)


async def _send_json(send, status: int, content: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away before its body was read")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class VllmHttpLayer:
    """API key, `/health` and `/generate` in front of `app` (see the module docstring)."""

    def __init__(self, app, *, api_key: Optional[str], model_ids: Sequence[str]):
        self.app = app
        self.api_key = api_key or None
        self.model_ids = sorted(model_ids)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root, path = _split_root(scope)
        method = scope.get("method")
        if (self.api_key and method != "OPTIONS" and path not in OPEN_PATHS
                and not authorized(_header(scope, b"authorization"), self.api_key)):
            await _send_json(send, 401, error_body(401, AUTH_ERROR, "authentication_error"),
                             [(b"www-authenticate", b"Bearer")])
        elif path == "/health" and method == "GET":
            await _send_json(send, 200, {"status": "ok", "models": self.model_ids})
        elif path == "/generate" and method == "POST":
            await self._generate(scope, receive, send, root)
        else:
            await self.app(scope, receive, send)

    async def _generate(self, scope, receive, send, root: str) -> None:
        try:
            req = GenerateRequest.model_validate_json(await _read_body(receive))
        except ValidationError as e:
            await _send_json(send, 400, _validation_error(e))
            return
        except ConnectionError:
            return
        body = json.dumps({"model": self.model_ids[0], "prompt": req.prompt, "max_tokens": req.max_new_tokens,
                           "temperature": 0.0, "stream": False}).encode()
        status, headers, answer = await self._call_inner(scope, receive, root + COMPLETIONS_PATH, body)
        if status != 200:
            # Already OpenAI-shaped (Ray's and vLLM's error handlers): the client sees the completion's error.
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
            return
        text = json.loads(answer)["choices"][0]["text"]
        await _send_json(send, 200, GenerateResponse(generated_text=text).model_dump())

    async def _call_inner(self, scope, receive, path: str, body: bytes) -> tuple[int, list, bytes]:
        """POST `body` to `path` of the wrapped app, in process, with the caller's other headers."""
        headers = [(k, v) for k, v in scope.get("headers") or () if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        inner = {**scope, "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers}
        sent = False

        async def inner_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the caller's body was read: this waits for its disconnect

        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def inner_send(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(inner, inner_receive, inner_send)
        return started.get("status", 500), list(started.get("headers") or []), b"".join(chunks)


def install(app, *, api_key: Optional[str], model_ids: Sequence[str]) -> None:
    """Put the layer outermost on a Starlette/FastAPI `app`, once, even after its middleware stack was built
    (vLLM's `build_app` builds it eagerly, and Starlette refuses `add_middleware` while a stack is cached; it
    is rebuilt on the next request)."""
    if getattr(app.state, "llmserve_nb_layer", False):
        return
    app.middleware_stack = None
    app.add_middleware(VllmHttpLayer, api_key=api_key, model_ids=list(model_ids))
    app.state.llmserve_nb_layer = True


def _split_root(scope) -> tuple[str, str]:
    """(root_path, the path below it): Serve mounts an app under its route prefix as the ASGI root_path."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and root != "/" and path.startswith(root):
        return root, path[len(root):] or "/"
    return "", path


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None
