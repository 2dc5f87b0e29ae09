"""The OpenAI ingress of the vLLM backend: Ray Serve LLM's `OpenAiIngress` plus this project's API key
and a `/health` probe. Ray's own ingress enforces no key at all (its `engine_kwargs.api_key` is ignored).

`llmserve_nb.backends.vllm.render` names this class in `build_openai_app`'s `ingress_cls_config`, Ray's extension
point for the ingress; Ray builds the FastAPI routes from it exactly as for its own class. It keeps
Ray's class name, so the deployment is still called `OpenAiIngress` (Ray's dashboards and the
`deployments:` overrides rely on that name).

- The key comes from `config.API_KEY_ENV` in the replica's environment (the application's
  `runtime_env.env_vars`, as for the transformers app). Unset or empty: no key is required.
- Every request needs `Authorization: Bearer <key>`, checked before the body is parsed; otherwise a 401
  with an OpenAI-shaped JSON error whose message contains "invalid or missing API key". `/health`,
  FastAPI's docs and CORS preflights stay open.
- Defence in depth: each OpenAI endpoint checks the key again, so the routes stay closed even if the
  ASGI hook below were not called; importing this module fails if Ray added an endpoint we do not wrap.

Import it only where Ray Serve LLM imports (the vLLM venv: `llmserve-nb vllm-env`).
"""
import os
import secrets
from typing import Annotated, Any, Optional

from fastapi import Form, Request
from starlette.responses import JSONResponse, Response

from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
    ScoreRequest,
    TokenizeCompletionRequest,
    TranscriptionRequest,
)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.serve.llm.ingress import OpenAiIngress as _RayOpenAiIngress

from llmserve_nb.config import API_KEY_ENV

__all__ = ["AUTH_ERROR", "OPEN_PATHS", "OpenAiIngress"]

AUTH_ERROR = "invalid or missing API key (send 'Authorization: Bearer <key>')"
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})


def _authorized(header: Optional[str], key: str) -> bool:
    return header is not None and secrets.compare_digest(header.encode(), f"Bearer {key}".encode())


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        status_code=401,
        content={"error": {"message": AUTH_ERROR, "type": "authentication_error", "param": None, "code": 401}},
        headers={"WWW-Authenticate": "Bearer"},
    )


class _ApiKeyMiddleware:
    """Pure ASGI: refuses unauthorized HTTP requests before routing, body parsing or streaming start."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and root != "/" and path.startswith(root):
                path = path[len(root):] or "/"
            if path not in OPEN_PATHS:
                header = None
                for name, value in scope.get("headers") or ():
                    if name == b"authorization":
                        header = value.decode("latin-1")
                        break
                if not _authorized(header, self.api_key):
                    await _unauthorized()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class OpenAiIngress(_RayOpenAiIngress):
    """Ray Serve LLM's OpenAI ingress with the project's API key and a `/health` route."""

    def __init__(self, llm_deployments, model_cards, **kwargs: Any):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._api_key = os.environ.get(API_KEY_ENV) or None

    # ---- the ASGI app: auth before routing, plus /health ------------------------------------
    def _set_asgi_app(self, app) -> None:
        # Serve's ingress wrapper calls this once per replica with the FastAPI app Ray built from this
        # class (`ASGIAppReplicaWrapper._set_asgi_app`), before the app starts: routes and middleware
        # can still be added here, and the app stays a FastAPI app (Serve's docs link keeps working).
        if not getattr(app, "_llmserve_nb_ready", False):
            app.add_api_route("/health", self._health, methods=["GET"], summary="Liveness: the ingress is up")
            if self._api_key:
                app.add_middleware(_ApiKeyMiddleware, api_key=self._api_key)
            app._llmserve_nb_ready = True
        super()._set_asgi_app(app)

    async def _health(self) -> dict:
        return {"status": "ok", "models": sorted(self._model_cards)}

    def _check(self, request: Optional[Request]) -> None:
        if self._api_key and not _authorized(
            request.headers.get("authorization") if request is not None else None, self._api_key
        ):
            raise OpenAIHTTPException(status_code=401, message=AUTH_ERROR, type="authentication_error")

    # ---- every OpenAI endpoint of Ray's ingress, key-checked --------------------------------
    async def models(self, request: Request) -> ModelList:
        self._check(request)
        return await super().models()

    async def model_data(self, model: str, request: Request) -> ModelCard:
        self._check(request)
        return await super().model_data(model)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check(request)
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check(request)
        return await super().chat(body, request)

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
        self._check(request)
        return await super().embeddings(body, request)

    async def transcriptions(self, body: Annotated[TranscriptionRequest, Form()], request: Request) -> Response:
        self._check(request)
        return await super().transcriptions(body, request)

    async def score(self, body: ScoreRequest, request: Request) -> Response:
        self._check(request)
        return await super().score(body, request)

    async def tokenize(self, body: TokenizeCompletionRequest, request: Request) -> Response:
        self._check(request)
        return await super().tokenize(body, request)

    async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response:
        self._check(request)
        return await super().detokenize(body, request)


# Fail closed: a Ray release that adds an endpoint must not serve it unchecked.
_unwrapped = sorted(name for name in DEFAULT_ENDPOINTS if name not in OpenAiIngress.__dict__)
if _unwrapped:
    raise ImportError(f"llmserve_nb.server.vllm_ingress does not key-check Ray's endpoints {_unwrapped}; update it")
