"""The interface every serving backend implements, so no caller branches on the backend's name.

A backend turns an `AppConfig` into one Serve application entry and back, names its deployments, says
what Serve can change in place for it, how to read its engine's batch on a live app, what the
cluster's Ray containers need in their environment, and which engine metrics it exports (the k8s
dashboard and alerts are rendered from them).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from llmserve_nb.config import ConfigError

if TYPE_CHECKING:
    from llmserve_nb.config import AppConfig

__all__ = ["Backend"]


class Backend(ABC):
    name: ClassVar[str]  # the value of EngineConfig.backend
    import_path: ClassVar[str]  # what Serve imports to build the application
    metric_prefix: ClassVar[str]  # engine metrics as Ray exports them, e.g. "ray_llmserve"
    engine_metrics: ClassVar[frozenset[str]]  # every engine metric name it exports, prefix included
    # Serve's HTTP answers per application as this backend's metrics count them: (counter, status label).
    http_requests: ClassVar[tuple[str, str]]
    live_batching: ClassVar[bool]  # batching.* changes in place (user_config -> reconfigure)
    replica_stats: ClassVar[bool]  # replicas answer GET /stats
    autoscaling_policies: ClassVar[tuple[str, ...]]  # the AutoscalingConfig.policy values it can serve

    def check(self, config: AppConfig) -> None:
        """Raise ConfigError for a config this backend cannot serve (checked before rendering).
        Backends extend it with their own rules."""
        scaling = config.deployment.autoscaling
        if scaling is not None and scaling.policy not in self.autoscaling_policies:
            raise ConfigError(
                f"autoscaling.policy={scaling.policy!r} is not available with backend={self.name!r}; use "
                + " or ".join(repr(p) for p in self.autoscaling_policies)
            )

    @abstractmethod
    def application(self, config: AppConfig) -> dict[str, Any]:
        """One entry of `applications:` (Serve deploy config, RayService serveConfigV2), for a config
        `check` accepted."""

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
    def engine_selector(self, config: AppConfig) -> str:
        """PromQL label matchers that select the engine metrics of `config`'s application."""

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
