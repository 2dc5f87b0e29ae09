"""Serving backends behind one interface: how an `AppConfig` becomes a Serve application and back.

`EngineConfig.backend` names the backend; the registry here is the only place that maps a name (or a
deployed application's import path) to its `Backend`, so no other module branches on the name.
"""
from __future__ import annotations

from typing import Any

from llmserve_nb.backends.base import Backend
from llmserve_nb.backends.transformers import TransformersBackend
from llmserve_nb.backends.vllm import VllmBackend
from llmserve_nb.config import AppConfig, ConfigError

__all__ = [
    "Backend",
    "TransformersBackend",
    "VllmBackend",
    "all_backends",
    "application",
    "backend_for",
    "backend_of_application",
    "config_of_application",
    "get_backend",
    "serve_config",
]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (TransformersBackend(), VllmBackend())}


def all_backends() -> tuple[Backend, ...]:
    return tuple(_BACKENDS.values())


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; llmserve_nb has {', '.join(map(repr, _BACKENDS))}") from None


def backend_for(config: AppConfig) -> Backend:
    return get_backend(config.engine.backend)


def backend_of_application(app: dict[str, Any]) -> Backend:
    """The backend that renders applications importing `app["import_path"]`."""
    path = app.get("import_path")
    for backend in _BACKENDS.values():
        if backend.import_path == path:
            return backend
    raise ConfigError(
        f"application {app.get('name')!r} runs {path!r}, which no llmserve_nb backend renders "
        f"({', '.join(b.import_path for b in _BACKENDS.values())})"
    )


def application(config: AppConfig) -> dict[str, Any]:
    """One entry of `applications:` in a Serve deploy config (and of a RayService serveConfigV2); a config
    its backend cannot serve raises ConfigError naming the field."""
    backend = backend_for(config)
    backend.check(config)
    return backend.application(config)


def serve_config(config: AppConfig, http_host: str = "0.0.0.0", http_port: int = 8000) -> dict[str, Any]:
    """The full Serve deploy config: `serve deploy`, `PUT /api/serve/applications/`, serveConfigV2."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "applications": [application(config)],
    }


def config_of_application(app: dict[str, Any]) -> AppConfig:
    """The AppConfig of a deployed application, from its Serve config entry (the inverse of `application`)."""
    return backend_of_application(app).config_of(app)
