"""The vLLM app's HTTP edge: Ray Serve LLM's classes with this project's API key, `/health` and `/generate`
(`llmserve_nb.server.vllm_http.VllmHttpLayer`). Ray's own ingress enforces no key at all (its
`engine_kwargs.api_key` is ignored).

Ray Serve LLM answers HTTP in one of two classes, so there are two subclasses, each keeping Ray's class name
(Ray names the deployments after them: `OpenAiIngress` and `LLMServer:<model_id>`, which its dashboards and
the `deployments:` overrides rely on):
- `OpenAiIngress` (the default path): named in `build_openai_app`'s `ingress_cls_config`, Ray's extension
  point for the ingress. Ray builds the FastAPI routes from it as for its own class; the layer wraps that
  app, and each OpenAI endpoint checks the key again (defence in depth: the routes stay closed even if the
  ASGI hook were not called; importing this module fails if Ray added an endpoint we do not wrap).
- `LLMServer` (with `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`): there is no ingress replica, and Ray refuses
  any `ingress_cls_config` (`ray.llm._internal.serve.core.ingress.builder._validate_direct_streaming_ingress_config`),
  but it takes the server class from `LLMConfig.server_cls` and builds the HTTP app in the replica with
  `LLMServer.__serve_build_asgi_app__` (vLLM's own FastAPI app). Our subclass wraps that app with the layer.

- The key comes from `config.API_KEY_ENV` in the replica's environment (the application's
  `runtime_env.env_vars`, as for the transformers app). Unset or empty: no key is required.

Import it only where Ray Serve LLM imports (the vLLM venv: `llmserve-nb vllm-env`).
"""
import os
from typing import Annotated, Any, Optional

from fastapi import Form, Request
from starlette.responses import Response

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
from ray.serve.llm.deployment import LLMServer as _RayLLMServer
from ray.serve.llm.ingress import OpenAiIngress as _RayOpenAiIngress

from llmserve_nb.config import API_KEY_ENV
from llmserve_nb.server.vllm_http import AUTH_ERROR, authorized, install

__all__ = ["LLMServer", "OpenAiIngress"]


def _api_key() -> Optional[str]:
    return os.environ.get(API_KEY_ENV) or None


class LLMServer(_RayLLMServer):
    """Ray Serve LLM's model server; with direct streaming it is the HTTP edge, so the layer wraps its app."""

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        install(app, api_key=_api_key(), model_ids=[self._llm_config.model_id])
        return app


class OpenAiIngress(_RayOpenAiIngress):
    """Ray Serve LLM's OpenAI ingress behind the layer, every OpenAI endpoint key-checked again."""

    def __init__(self, llm_deployments, model_cards, **kwargs: Any):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._api_key = _api_key()

    def _set_asgi_app(self, app) -> None:
        # Serve's ingress wrapper calls this once per replica with the FastAPI app Ray built from this
        # class (`ASGIAppReplicaWrapper._set_asgi_app`), before the app starts; the app stays a FastAPI
        # app (Serve's docs link keeps working).
        install(app, api_key=self._api_key, model_ids=list(self._model_cards))
        super()._set_asgi_app(app)

    def _check(self, request: Optional[Request]) -> None:
        if self._api_key and not authorized(
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
