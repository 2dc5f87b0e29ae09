"""The interface every serving backend implements, so no caller branches on the backend's name.

A backend turns an `AppConfig` into one Serve application entry and back, names its deployments, says
what Serve can change in place for it, how to read its engine's batch on a live app, and what the
cluster's Ray containers need in their environment.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from llmserve_nb.config import AppConfig

__all__ = ["Backend"]


class Backend(ABC):
    name: ClassVar[str]  # the value of EngineConfig.backend
    import_path: ClassVar[str]  # what Serve imports to build the application
    metric_prefix: ClassVar[str]  # engine metrics as Ray exports them, e.g. "ray_llmserve"
    live_batching: ClassVar[bool]  # batching.* changes in place (user_config -> reconfigure)
    replica_stats: ClassVar[bool]  # replicas answer GET /stats

    @abstractmethod
    def check(self, config: AppConfig) -> None:
        """Raise ConfigError for a config this backend cannot serve (checked before rendering)."""

    @abstractmethod
    def application(self, config: AppConfig) -> dict[str, Any]:
        """One entry of `applications:` (Serve deploy config, RayService serveConfigV2)."""

    @abstractmethod
    def config_of(self, app: dict[str, Any]) -> AppConfig:
        """The AppConfig behind a deployed application entry (the inverse of `application`)."""

    @abstractmethod
    def deployment_names(self, config: AppConfig) -> list[str]:
        """The application's Serve deployments, the one that holds the model first."""

    def model_deployment(self, config: AppConfig) -> str:
        """The deployment whose replicas hold the model: the one autoscaling scales."""
        return self.deployment_names(config)[0]

    @abstractmethod
    def cluster_env(self, config: AppConfig) -> dict[str, str]:
        """Environment for every Ray container of a cluster serving `config`."""

    @abstractmethod
    def batch_sampler(self, app: Any) -> Callable[[], dict[str, float]]:
        """For `run_observed`: a call that reads the engine's batch of the live `app` (an AppHandle) now,
        as {"running": requests decoding, "waiting": requests queued for a slot}."""

    @abstractmethod
    def burst(self, app: Any, n: int, max_tokens: int, input_tokens: int) -> dict[str, Any]:
        """`AppHandle.burst`: `n` concurrent completions and the batches the engine formed for them."""
