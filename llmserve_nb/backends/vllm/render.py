"""`EngineConfig(backend="vllm")`: the same `AppConfig` rendered as a Ray Serve LLM application.

No vLLM integration of our own: the application is Ray's `ray.serve.llm:build_openai_app` with one
`LLMConfig` (vLLM engine) and this package's `llmserve_nb.server.vllm_ingress:OpenAiIngress` (Ray's OpenAI
ingress plus the project's API key and `/health`), wired through the builder's `ingress_cls_config`.

The split follows the transformers app (and Serve's code-version rule): `args` hold only what builds a
replica (model, engine kwargs, accelerator and placement, the engine's environment, the ingress class);
every option Serve changes in place (replicas, autoscaling, `max_ongoing_requests`, queue limit and
backpressure, health checks, graceful shutdown) goes in the `deployments:` entries for
`LLMServer:<model_id>` and `OpenAiIngress`, so changing it never reloads the model. This also replaces
Ray Serve LLM's defaults of 1e9 for `max_ongoing_requests` and `target_ongoing_requests`, which
switch autoscaling and admission control off.

Resources come from `config.deployment`: each `LLMServer` replica reserves exactly `num_cpus` CPUs
(and `num_gpus` GPUs) through Ray Serve LLM's `placement_group_config` (the replica actor itself takes 0,
so the default app no longer wants 3 CPUs and schedules on a 2-core node); on a CPU cluster the ingress
takes 0 CPUs, on a GPU cluster Ray's default 1. `accelerator_type` is set only for GPUs (never for CPU).

Admission control sits at the HTTP edge: the ingress admits at most the model's total capacity
(`max_ongoing_requests` x replicas) and queues `max_queued_requests` more, past which Serve answers
`backpressure_status_code` with Retry-After. The `LLMServer` queue is left unbounded: a refusal there
would surface inside the ingress as a 500, not as backpressure.

Ray's direct streaming is opted into with Ray's own switch, `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` in the
config's `runtime_env.env_vars` (`DIRECT_STREAMING_ENV`; Serve's build task reads it from the app's runtime_env).
The app then has no ingress replica: the `LLMServer` replicas answer HTTP with vLLM's own app, and Ray adds an
`LLMRouter` deployment that HAProxy asks for a replica. Ray refuses any `ingress_cls_config` then, so our
`LLMServer` subclass (`LLMConfig.server_cls`) carries the API key, `/health` and `/generate`, and the `LLMServer`
entry, now the HTTP edge, takes the admission control (`max_queued_requests`, backpressure). Serve builds such an
app only where the cluster runs HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`, part of `HIGH_THROUGHPUT_ENV`).

`check` refuses what Ray Serve LLM cannot run; `application` renders a checked config and `config_of`
reads a deployed entry back. Rendering needs no vLLM: it works in the notebook's environment (the embedded
model's safetensors copy is made with `llmserve_nb.engine`). The replicas run in a venv with vLLM
(`llmserve-nb vllm-env`).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

from llmserve_nb.backends.serve_options import (
    GRACEFUL_SHUTDOWN_FIELDS,
    HEALTH_CHECK_FIELDS,
    backpressure_fields,
    copied_fields,
    replica_fields,
    router_fields,
    with_derived_limits,
)
from llmserve_nb.config import API_KEY_ENV, EMBEDDED_MODEL, AppConfig, ConfigError, EngineConfig

__all__ = [
    "DIRECT_STREAMING_ENV",
    "HIGH_THROUGHPUT_ENV",
    "IMPORT_PATH",
    "INGRESS_CLS",
    "INGRESS_DEPLOYMENT",
    "ROUTER_DEPLOYMENT",
    "SERVER_CLS",
    "application",
    "check",
    "config_of",
    "direct_streaming",
    "llm_config",
    "llm_server_deployment_name",
]

IMPORT_PATH = "ray.serve.llm:build_openai_app"  # Ray Serve LLM's own app builder
INGRESS_CLS = "llmserve_nb.server.vllm_ingress:OpenAiIngress"
INGRESS_DEPLOYMENT = "OpenAiIngress"  # our ingress keeps Ray's class name, hence Ray's deployment name
# Direct streaming: our LLMServer (Ray's name kept, so the deployment is still `LLMServer:<model_id>`) is the
# HTTP edge, and Ray adds its `LLMRouter` deployment to pick a replica.
SERVER_CLS = "llmserve_nb.server.vllm_ingress:LLMServer"
ROUTER_DEPLOYMENT = "LLMRouter"
DIRECT_STREAMING_ENV = {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}
# Ray's high-throughput Serve mode (Ray >= 2.55; its KubeRay guide sets both on every pod): HAProxy instead
# of Serve's Python proxy, and gRPC between replicas. Every Ray process reads them at start, so they are
# the cluster's environment, not the app's. Measured against bare vLLM on 2 CPU cores (benchmarks/
# serve_llm_settings.py): tok/s at c=8 0.56x -> 0.78x, TTFT at c=1 3.1x -> 2.7x. The image needs `haproxy`
# (Ray's own images ship it; k8s/image/Dockerfile checks).
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# vLLM on CPU: Ray forwards no VLLM_* variables to its workers, so they travel in the LLMConfig's
# runtime_env. Without a KV-cache size start-up refuses for lack of memory; without the thread binding
# vLLM runs one thread whatever the replica reserved.
CPU_KVCACHE_GIB = 2


def llm_server_deployment_name(model_id: str) -> str:
    """The deployment name Ray Serve LLM gives a model (`LLMServer:` + the model id, '/' -> '--', '.' -> '_')."""
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


def _on_gpu(config: AppConfig) -> bool:
    if config.engine.device == "cuda":
        return True
    if config.engine.device == "cpu":
        return False
    return config.deployment.num_gpus > 0


@functools.lru_cache(maxsize=16)
def _converted_dir(model_source: str, gguf_file: str | None, cache_dir: str | None) -> str:
    from llmserve_nb.engine import local_model_dir

    engine = EngineConfig(model_source=model_source, gguf_file=gguf_file, cache_dir=cache_dir)
    return str(local_model_dir(engine))


def model_source(engine: EngineConfig) -> str:
    """What vLLM loads. vLLM cannot read a GGUF on CPU, so the embedded model (and any GGUF) becomes the
    safetensors copy this package converts once (`llmserve_nb.engine.local_model_dir`, ~16 s the first
    time); an HF id or a plain local directory is passed through."""
    if engine.model_source == EMBEDDED_MODEL or engine.gguf_file:
        return _converted_dir(engine.model_source, engine.gguf_file, engine.cache_dir)
    return engine.model_source


def _workers(engine_kwargs: dict[str, Any]) -> int:
    return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))


def engine_kwargs(config: AppConfig) -> dict[str, Any]:
    """vLLM engine arguments: the typed engine fields first, `engine.engine_kwargs` on top (they win)."""
    e = config.engine
    kw: dict[str, Any] = {"max_model_len": e.max_model_len, "max_num_seqs": e.max_num_seqs}
    if e.dtype != "auto":
        kw["dtype"] = e.dtype
    elif not _on_gpu(config):
        # The project's rule for 'auto' on CPU: float32 is never wrong, and on CPUs without native bf16
        # (AVX2 only, like CI's) vLLM's bf16 runs 2.5-4x slower (FACTS.md).
        kw["dtype"] = "float32"
    if e.trust_remote_code:
        kw["trust_remote_code"] = True
    g = config.deployment.num_gpus
    if 0 < g < 1:
        # A fractional GPU: let vLLM take only its share of the memory.
        kw["gpu_memory_utilization"] = round(0.9 * g, 3)
    kw.update(e.engine_kwargs)
    return kw


def _cpu_threads(config: AppConfig) -> int:
    return config.engine.torch_threads or max(1, math.floor(config.deployment.num_cpus))


def _engine_env(config: AppConfig) -> dict[str, str]:
    env: dict[str, str] = {}
    if not _on_gpu(config):
        threads = _cpu_threads(config)
        env.update({
            "VLLM_CPU_KVCACHE_SPACE": str(CPU_KVCACHE_GIB),
            # Unpinned OMP threads, as many as the replica reserved. Pinning ("0-<n-1>", how vLLM's own server
            # is run) is wrong under Ray: Ray does not tell a replica which cores are its own, so every replica
            # of a node pinned to the same cores (notebook 02's two 1-CPU replicas on a 2-core node both ran on
            # core 0). Pinned OMP threads that share their cores with Serve's proxy and ingress also wait at
            # every barrier for a descheduled thread: on this project's heavily loaded 2-core CI machine
            # (load average 30-60), bare vLLM pinned to 0-1 generated 0.3-0.8 tok/s. The throughput effect of
            # `nobind` vs pinning on a quiet node is not measured yet: benchmarks/serve_llm_settings.py,
            # candidates `rendered` vs `bind` (and --bare-nobind), measures it.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        })
    # The application's env_vars reach the replica actors through Serve, but not the vLLM engine workers
    # Ray Serve LLM starts: those get the LLMConfig's runtime_env, so the user's variables are copied here.
    # The API key is not: only the ingress reads it, and it need not be written into `args`.
    user = dict((config.runtime_env or {}).get("env_vars") or {})
    user.pop(API_KEY_ENV, None)
    env.update({k: str(v) for k, v in user.items()})
    return env


def _placement(config: AppConfig, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`placement_group_config`, replica `ray_actor_options`): the replica reserves exactly what
    `config.deployment` says, spread over its vLLM workers (tensor x pipeline parallel)."""
    d = config.deployment
    workers = _workers(kw)
    if _on_gpu(config):
        bundle = {"GPU": d.num_gpus / workers, "CPU": d.num_cpus / workers}
        strategy = "PACK"
    else:
        # Ray refuses a placement-group bundle whose resources are all 0.
        bundle = {"CPU": max(d.num_cpus / workers, 0.01)}
        strategy = "STRICT_PACK"
    actor: dict[str, Any] = {"num_cpus": 0}
    if d.resources:
        actor["resources"] = dict(d.resources)  # Ray adds these to the replica's first bundle
    return {"bundle_per_worker": _tidy(bundle), "strategy": strategy}, actor


def _tidy(bundle: dict[str, float]) -> dict[str, float]:
    return {k: (int(v) if float(v).is_integer() else v) for k, v in bundle.items()}


def direct_streaming(config: AppConfig) -> bool:
    """Whether `config` opts into Ray's direct streaming (`DIRECT_STREAMING_ENV` in its runtime_env)."""
    env = (config.runtime_env or {}).get("env_vars") or {}
    return all(str(env.get(k)) == v for k, v in DIRECT_STREAMING_ENV.items())


def llm_config(config: AppConfig) -> dict[str, Any]:
    """The one `LLMConfig` (as a dict) in `args.llm_configs`: everything that builds an LLMServer replica."""
    kw = engine_kwargs(config)
    placement, actor = _placement(config, kw)
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": config.engine.model_name, "model_source": model_source(config.engine)},
        "engine_kwargs": kw,
        "accelerator_config": {"kind": "gpu" if _on_gpu(config) else "cpu"},
        "placement_group_config": placement,
        # Only the replica actor's resources: a `ray_actor_options` in the `deployments:` entry would
        # replace the runtime_env Ray Serve LLM builds for the replica (its VLLM_* variables included).
        "deployment_config": {"ray_actor_options": actor},
    }
    if direct_streaming(config):
        cfg["server_cls"] = SERVER_CLS
    if config.deployment.accelerator_type:
        cfg["accelerator_type"] = config.deployment.accelerator_type
    env = _engine_env(config)
    if env:
        cfg["runtime_env"] = {"env_vars": env}
    return cfg


def llm_server_options(config: AppConfig) -> dict[str, Any]:
    """The `deployments:` entry of `LLMServer:<model_id>` (without its name): all updated in place."""
    d = config.deployment
    # Behind the ingress the queue is unbounded on purpose: the ingress is the only caller and admits at most
    # the model's capacity, and a refusal at this hop would reach the client as a 500 instead of backpressure.
    # With direct streaming this is the HTTP edge, so the edge's admission control goes here.
    admission = ({"max_queued_requests": config.max_queued_requests, "backpressure_config": d.backpressure_config()}
                 if direct_streaming(config) else {"max_queued_requests": -1})
    return {
        "max_ongoing_requests": config.max_ongoing_requests,
        **admission,
        **d.health_check_options(),
        **d.graceful_shutdown_options(),
        # Always rendered, a fixed count pinned (see DeploymentConfig.serve_autoscaling_config): switching
        # from num_replicas to autoscaling (the tuner's checkbox) then updates the LLMServer in place
        # (measured, tests/test_vllm_backend.py), and Ray's own autoscaling_config (target 1e9) is replaced.
        "autoscaling_config": d.serve_autoscaling_config(),
        # Ray's OpenAiIngress calls LLMServer through a handle with the parsed request (its `prompt` or
        # `messages`), which is what the prefix router reads, and passes on the x-session-id header for the
        # session router. A router change needs a fresh deploy (see DeploymentConfig.request_router).
        **_router_option(d.request_router_config()),
    }


def _router_option(router: dict[str, Any] | None) -> dict[str, Any]:
    return {} if router is None else {"request_router_config": router}


def ingress_options(config: AppConfig) -> dict[str, Any]:
    """The `deployments:` entry of `OpenAiIngress` (without its name): the HTTP edge's admission control."""
    d = config.deployment
    opts: dict[str, Any] = {
        "num_replicas": 1,
        "autoscaling_config": None,
        "max_ongoing_requests": config.max_ongoing_requests * d.most_replicas,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": d.backpressure_config(),
        **d.graceful_shutdown_options(),
    }
    if not _on_gpu(config):
        # The default app wants 3 CPUs (the ingress's 1 + the server's 2) and never schedules on 2 cores.
        opts["ray_actor_options"] = {"num_cpus": 0}
    return opts


def check(config: AppConfig) -> None:
    """What Ray Serve LLM cannot run, refused with the field to change."""
    model_id = config.engine.model_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", model_id):
        raise ConfigError(f"model id {model_id!r}: use letters, digits, '.', '_', '-' and '/' only")
    d = config.deployment
    if _on_gpu(config):
        if d.num_gpus <= 0:
            raise ConfigError("engine.device='cuda' with backend='vllm' needs deployment.num_gpus > 0")
        workers = _workers(engine_kwargs(config))
        if workers > 1 and d.num_gpus < workers:
            raise ConfigError(
                f"deployment.num_gpus ({d.num_gpus}) is below tensor_parallel_size x pipeline_parallel_size "
                f"({workers}): each vLLM worker needs its own GPU"
            )
    elif d.accelerator_type:
        # Ray Serve LLM refuses accelerator_type for a CPU deployment (it would never schedule anyway).
        raise ConfigError(
            f"deployment.accelerator_type={d.accelerator_type!r} needs deployment.num_gpus > 0 "
            "with backend='vllm' (a CPU deployment has no accelerator type)"
        )


def application(config: AppConfig) -> dict[str, Any]:
    """One entry of `applications:` (Serve deploy config / RayService serveConfigV2), for a config `check`
    accepted."""
    server = {"name": llm_server_deployment_name(config.engine.model_name), **llm_server_options(config)}
    if direct_streaming(config):
        # Ray refuses an ingress_cls_config with direct streaming: the key check rides on server_cls.
        args: dict[str, Any] = {"llm_configs": [llm_config(config)]}
        deployments = [server]
    else:
        args = {"llm_configs": [llm_config(config)], "ingress_cls_config": {"ingress_cls": INGRESS_CLS}}
        deployments = [server, {"name": INGRESS_DEPLOYMENT, **ingress_options(config)}]
    app: dict[str, Any] = {"name": config.name, "route_prefix": config.route_prefix, "import_path": IMPORT_PATH,
                           "args": args, "deployments": deployments}
    if config.runtime_env:
        app["runtime_env"] = config.runtime_env
    return app


def config_of(app: dict[str, Any]) -> AppConfig:
    """The AppConfig behind a deployed vLLM application entry (what `application` rendered), so a notebook
    can attach to a running vLLM app (`Cluster.app`) and update it. The embedded model comes back as its
    safetensors copy with its served name; everything else round-trips exactly."""
    if app.get("import_path") != IMPORT_PATH:
        raise ConfigError(f"application {app.get('name')!r} runs {app.get('import_path')!r}, not {IMPORT_PATH}")
    args = app.get("args") or {}
    llms = args.get("llm_configs") or []
    if len(llms) != 1 or not isinstance(llms[0], dict):
        raise ConfigError(f"application {app.get('name')!r} serves {len(llms)} models; llmserve_nb renders exactly one")
    llm = llms[0]
    loading = llm.get("model_loading_config") or {}
    model_id, source = loading.get("model_id"), loading.get("model_source") or loading.get("model_id")
    kw = dict(llm.get("engine_kwargs") or {})
    engine: dict[str, Any] = {"backend": "vllm", "model_source": source}
    for typed in ("max_model_len", "max_num_seqs", "trust_remote_code"):
        if typed in kw:
            engine[typed] = kw.pop(typed)
    if kw.get("dtype") in ("float32", "bfloat16", "float16"):
        engine["dtype"] = kw.pop("dtype")
    engine["engine_kwargs"] = kw
    if model_id and model_id != str(source).rstrip("/").split("/")[-1]:
        engine["served_model_name"] = model_id

    deployment: dict[str, Any] = {}
    gpu = (llm.get("accelerator_config") or {}).get("kind") == "gpu"
    bundle = (llm.get("placement_group_config") or {}).get("bundle_per_worker") or {}
    workers = _workers(kw)
    if "CPU" in bundle:
        deployment["num_cpus"] = bundle["CPU"] * workers
    if gpu and "GPU" in bundle:
        deployment["num_gpus"] = bundle["GPU"] * workers
    if llm.get("accelerator_type"):
        deployment["accelerator_type"] = llm["accelerator_type"]
    actor = (llm.get("deployment_config") or {}).get("ray_actor_options") or {}
    if actor.get("resources"):
        deployment["resources"] = actor["resources"]
    deps = {d.get("name"): d for d in app.get("deployments") or []}
    server = deps.get(llm_server_deployment_name(model_id or ""), {})
    ingress = deps.get(INGRESS_DEPLOYMENT, {})
    deployment.update(copied_fields(server, ("max_ongoing_requests", *HEALTH_CHECK_FIELDS, *GRACEFUL_SHUTDOWN_FIELDS)))
    deployment.update(replica_fields(server))
    deployment.update(router_fields(server))
    edge = ingress or server  # where admission control sits: no ingress with direct streaming
    deployment.update(copied_fields(edge, ("max_queued_requests",)))
    deployment.update(backpressure_fields(edge))
    data: dict[str, Any] = {"name": app.get("name", "llm"), "route_prefix": app.get("route_prefix", "/"),
                            "engine": engine, "deployment": deployment}
    if app.get("runtime_env"):
        data["runtime_env"] = app["runtime_env"]
    if gpu and not deployment.get("num_gpus"):
        engine["device"] = "cuda"
    return with_derived_limits(AppConfig.from_args(data))
