"""`EngineConfig(backend="transformers")`: this package's engine, served by `llmserve_nb.server.app:build_app`.

One deployment, `LLMServer`, whose options are `AppConfig.deployment_options()` (the same dict
`build_app` applies when the app is started with `serve run`); `args` hold only what builds a replica
(`AppConfig.build_args()`), so everything Serve changes in place travels in the `deployments:` entry.
Batching is the entry's `user_config`: it changes live. Replicas answer `GET /stats`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from llmserve_nb.backends.base import Backend
from llmserve_nb.backends.burst import burst_figures, burst_load
from llmserve_nb.backends.serve_options import (
    GRACEFUL_SHUTDOWN_FIELDS,
    HEALTH_CHECK_FIELDS,
    backpressure_fields,
    copied_fields,
    replica_fields,
    router_fields,
    with_derived_limits,
)
from llmserve_nb.config import DEPLOYMENT_NAME, INGRESS_DEPLOYMENT_NAME, AppConfig, ConfigError, nest_dotted
from llmserve_nb.observability.promql import METRIC_NAMES, PREFIX

if TYPE_CHECKING:
    from llmserve_nb.bench import BenchRun

__all__ = ["TransformersBackend"]

# Keys of the `deployments:` entry that are DeploymentConfig fields of the same name.
_ENTRY_FIELDS = (
    "max_ongoing_requests", "max_queued_requests", "max_surge_percent", *HEALTH_CHECK_FIELDS, *GRACEFUL_SHUTDOWN_FIELDS,
)
_ACTOR_FIELDS = ("num_cpus", "num_gpus", "accelerator_type", "resources")


class TransformersBackend(Backend):
    name = "transformers"
    import_path = "llmserve_nb.server.app:build_app"
    metric_prefix = PREFIX.rstrip("_")
    engine_metrics = frozenset(METRIC_NAMES)
    http_requests = (f"{PREFIX}http_requests_total", "status")
    live_batching = True
    replica_stats = True
    autoscaling_policies = ("ongoing_requests", "llm")

    def check(self, config: AppConfig) -> None:
        super().check(config)
        if config.engine.engine_kwargs:
            raise ConfigError(
                f"engine.engine_kwargs={config.engine.engine_kwargs!r}: engine arguments are passed to vLLM only "
                "(backend='vllm'); the transformers engine takes the typed engine fields"
            )
        mor = config.deployment.max_ongoing_requests
        if mor is not None and mor < config.batching.max_batch_size:
            raise ConfigError(
                f"deployment.max_ongoing_requests ({mor}) is below batching.max_batch_size "
                f"({config.batching.max_batch_size}): a replica could never fill a batch"
            )

    def application(self, config: AppConfig) -> dict[str, Any]:
        """With a router that reads the prompt (`server.router`), `args` say so (`build_app` then puts
        LLMIngress in front of LLMServer) and LLMIngress has its own entry; any other router is only
        LLMServer's `request_router_config`, read by Serve's proxies."""
        deployments = [{"name": DEPLOYMENT_NAME, **config.deployment_options()}]
        if (ingress := config.ingress_options()) is not None:
            deployments.append({"name": INGRESS_DEPLOYMENT_NAME, **ingress})
        app: dict[str, Any] = {
            "name": config.name,
            "route_prefix": config.route_prefix,
            "import_path": self.import_path,
            "args": config.build_args(),
            "deployments": deployments,
        }
        if config.runtime_env:
            app["runtime_env"] = config.runtime_env
        return app

    def config_of(self, app: dict[str, Any]) -> AppConfig:
        """`args` (engine, name), the `deployments:` entry (batching as user_config, replicas, limits,
        resources), the route prefix and runtime_env."""
        if app.get("import_path") != self.import_path:
            raise ConfigError(
                f"application {app.get('name')!r} runs {app.get('import_path')!r}, not {self.import_path}"
            )
        data = nest_dotted(app.get("args") or {})
        data.update(name=app.get("name", data.get("name", "llm")), route_prefix=app.get("route_prefix", "/"))
        if app.get("runtime_env"):
            data["runtime_env"] = app["runtime_env"]
        entries = {d.get("name"): d for d in app.get("deployments") or []}
        entry = entries.get(DEPLOYMENT_NAME, {})
        user_config = dict(entry.get("user_config") or {})
        deployment = dict(data.get("deployment") or {})
        routed_by_prompt = deployment.get("request_router")
        if "request_timeout_s" in user_config:
            deployment["request_timeout_s"] = user_config.pop("request_timeout_s")
        targets = user_config.pop("autoscaling_targets", None)
        if user_config:
            data["batching"] = user_config
        deployment.update(copied_fields(entry, _ENTRY_FIELDS))
        deployment.update(replica_fields(entry, targets))
        deployment.update(backpressure_fields(entry))
        deployment.update(copied_fields(entry.get("ray_actor_options") or {}, _ACTOR_FIELDS))
        deployment.update(router_fields(entry))
        if routed_by_prompt:
            # Admission is LLMIngress's then (see AppConfig.deployment_options).
            ingress = entries.get(INGRESS_DEPLOYMENT_NAME, {})
            deployment.pop("max_queued_requests", None)
            deployment.update(copied_fields(ingress, ("max_queued_requests",)))
            deployment.update(backpressure_fields(ingress))
            if deployment.get("request_router", routed_by_prompt) != routed_by_prompt:
                raise ConfigError(
                    f"application {app.get('name')!r}: args say request_router={routed_by_prompt!r} but "
                    f"{DEPLOYMENT_NAME} runs {deployment['request_router']!r}"
                )
        if deployment:
            data["deployment"] = deployment
        return with_derived_limits(AppConfig.from_args(data))

    def deployment_names(self, config: AppConfig) -> list[str]:
        return [DEPLOYMENT_NAME, INGRESS_DEPLOYMENT_NAME] if config.deployment.routes_by_prompt else [DEPLOYMENT_NAME]

    def engine_selector(self, config: AppConfig) -> str:
        # This engine's metrics carry Serve's application label.
        return f'application="{config.name}"'

    def cluster_env(self, config: AppConfig) -> dict[str, str]:
        return {}

    def batch_sampler(self, app: Any) -> Callable[[], dict[str, float]]:
        """The answering replica's engine, from its /stats (each replica keeps its own)."""

        def sample() -> dict[str, float]:
            stats = app.stats()
            return {"running": stats["num_requests_running"], "waiting": stats["num_requests_waiting"]}

        return sample

    def burst(self, app: Any, n: int, max_tokens: int, input_tokens: int) -> dict[str, Any]:
        """The batches the replica formed: the difference of its /stats histogram before and after, exact for
        a single replica and quiet traffic (each replica keeps its own counters). Requests that fail raise
        the app's ClusterError, with Serve's view of the app."""
        before = app.stats()
        run: BenchRun = burst_load(app, n, max_tokens, input_tokens)()
        after = app.stats()
        summary = run.summary()
        if summary["completed"] < n:
            raise app.unanswered_error(
                f"burst of {n} requests to {app.base_url}",
                f"{summary['errors']} failed, {summary['incomplete']} unfinished "
                f"({summary['error_example'] or 'no error'})",
            )
        hist = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
        hist = {k: v for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])) if v}
        return {**burst_figures(run, n), "batch_size_histogram": hist,
                "max_batch_size_seen": max((int(k) for k in hist), default=0)}
