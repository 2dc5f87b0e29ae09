"""Serve's generic deployment options read back into `DeploymentConfig` fields, for every backend.

The rendering side is `DeploymentConfig` itself (`serve_autoscaling_config`, `backpressure_config`,
`health_check_options`, `graceful_shutdown_options`, `most_replicas`), because the replica side
(`server.app:build_app`) renders the transformers deployment from the config alone. Each function here
is the inverse of one of them, so both backends read a deployed entry back the same way.
"""
from __future__ import annotations

from typing import Any

from llmserve_nb.config import LLM_POLICY, REQUEST_ROUTER_CLASSES, AppConfig, AutoscalingConfig, ConfigError

__all__ = [
    "GRACEFUL_SHUTDOWN_FIELDS",
    "HEALTH_CHECK_FIELDS",
    "PINNED",
    "backpressure_fields",
    "copied_fields",
    "replica_fields",
    "router_fields",
    "with_derived_limits",
]

# How `DeploymentConfig.serve_autoscaling_config` renders a fixed replica count.
PINNED = frozenset({"min_replicas", "max_replicas", "initial_replicas"})
HEALTH_CHECK_FIELDS = ("health_check_period_s", "health_check_timeout_s")
GRACEFUL_SHUTDOWN_FIELDS = ("graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s")


def copied_fields(entry: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The keys of a `deployments:` entry that are DeploymentConfig fields of the same name."""
    return {k: entry[k] for k in keys if k in entry}


def replica_fields(entry: dict[str, Any], targets: dict[str, float] | None = None) -> dict[str, Any]:
    """`num_replicas` or `autoscaling` of a `deployments:` entry: the inverse of
    `DeploymentConfig.serve_autoscaling_config`. `targets` are the llm policy's targets, which travel in
    the transformers app's user_config (`autoscaling_targets`)."""
    scaling = entry.get("autoscaling_config") or {}
    if scaling and set(scaling) == PINNED and len(set(scaling.values())) == 1:
        return {"num_replicas": scaling["min_replicas"]}
    if not scaling:
        return copied_fields(entry, ("num_replicas",))
    serve_fields = set(AutoscalingConfig.model_fields) - AutoscalingConfig.LLM_FIELDS
    autoscaling = {k: v for k, v in scaling.items() if k in serve_fields}
    if (scaling.get("policy") or {}).get("policy_function") == LLM_POLICY:
        autoscaling["policy"] = "llm"
        if targets:
            autoscaling.update(target_ttft_s=targets["ttft_s"], target_waiting_requests=targets["waiting_requests"])
    return {"autoscaling": autoscaling}


def backpressure_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `DeploymentConfig.backpressure_config` in a `deployments:` entry."""
    backpressure = entry.get("backpressure_config") or {}
    fields: dict[str, Any] = {}
    if "status_code" in backpressure:
        fields["backpressure_status_code"] = backpressure["status_code"]
    if backpressure.get("retry_after_s") is not None:
        fields["retry_after_s"] = backpressure["retry_after_s"]
    return fields


# Other spellings of the routers this package renders: Serve's own default path, and Ray's public re-export
# of the prefix router (the same router; see config.REQUEST_ROUTER_CLASSES).
_ROUTER_ALIASES = {
    "ray.serve._private.request_router.PowerOfTwoChoicesRequestRouter": "power_of_two",
    "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter": "power_of_two",
    "ray.serve.llm.request_router.PrefixCacheAffinityRouter": "prefix_affinity",
    **{path: name for name, path in REQUEST_ROUTER_CLASSES.items()},
}


def router_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """`request_router` of a `deployments:` entry: the inverse of `DeploymentConfig.request_router_config`.
    A router this package does not render is refused rather than dropped, so that an update from the
    AppConfig never replaces it silently."""
    cls = (entry.get("request_router_config") or {}).get("request_router_class")
    if not cls:
        return {}
    name = _ROUTER_ALIASES.get(cls.replace(":", "."))  # Serve takes "module.Class" and "module:Class"
    if name is None:
        raise ConfigError(
            f"request_router_config.request_router_class={cls!r} is not a router llmserve_nb renders "
            f"({', '.join(sorted(set(_ROUTER_ALIASES.values())))})"
        )
    return {"request_router": name}


def with_derived_limits(config: AppConfig) -> AppConfig:
    """`config` with each admission limit that equals the one derived from the rest back to None (derived):
    an entry holds numbers, and a limit rendered from the defaults should come back as the default."""
    for key in ("max_ongoing_requests", "max_queued_requests"):
        derived = config.with_overrides(**{f"deployment.{key}": None})
        if getattr(derived, key) == getattr(config, key):
            config = derived
    return config
