"""AppConfig: validation errors, round trips, the backend registry and the configs it renders (checked by
Ray's own schema)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from llmserve_nb.backends import (
    TransformersBackend,
    VllmBackend,
    all_backends,
    application,
    backend_for,
    backend_of_application,
    config_of_application,
    get_backend,
    serve_config,
)
from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig, ConfigError, EngineConfig

PACKAGE = Path(__file__).resolve().parents[1] / "llmserve_nb"


def test_defaults_render_a_serve_config_ray_accepts():
    cfg = AppConfig()
    doc = serve_config(cfg, http_host="127.0.0.1", http_port=8123)
    schema = ServeDeploySchema.model_validate(doc)  # Ray's own schema for serve deploy / REST / RayService
    app = schema.applications[0]
    assert app.import_path == "llmserve_nb.server.app:build_app" == TransformersBackend.import_path
    dep = app.deployments[0]
    assert dep.name == DEPLOYMENT_NAME
    assert dep.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    # The engine's whole running batch plus one admission batch forming: the default never caps
    # continuous batching (it once did: 16 slots for a 64-row engine halved throughput at c=32).
    assert dep.max_ongoing_requests == cfg.engine.max_num_seqs + cfg.batching.max_batch_size == 72
    assert dep.max_ongoing_requests >= cfg.engine.max_num_seqs
    # Bounded queue with a retry hint, instead of queueing without limit.
    assert dep.max_queued_requests == 2 * 72
    assert dep.backpressure_config.status_code == 503 and dep.backpressure_config.retry_after_s == 2
    assert schema.http_options.port == 8123


def test_json_and_yaml_round_trip(tmp_path):
    cfg = AppConfig().with_overrides(**{
        "engine.model_source": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "deployment.num_gpus": 0.25,
        "batching.max_batch_size": 16,
    })
    (tmp_path / "c.json").write_text(cfg.model_dump_json())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert AppConfig.from_file(tmp_path / "c.json") == cfg
    assert AppConfig.from_file(tmp_path / "c.yaml") == cfg
    # args + the deployments entry is everything needed to rebuild the same config.
    assert config_of_application(application(cfg)) == cfg


def test_only_what_builds_a_replica_is_in_args():
    """Regression: autoscaling, replica counts and max_ongoing_requests travelled in `args`, the app's code
    version, so changing them restarted every replica (19 s, model reloaded). Serve updates the
    `deployments:` entry in place."""
    base = AppConfig()
    changed = base.with_overrides(**{
        "deployment.autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "deployment.max_ongoing_requests": 40,
        "deployment.max_queued_requests": 10,
        "deployment.num_cpus": 2,
        "deployment.graceful_shutdown_timeout_s": 5,
        "batching.max_batch_size": 16,
    })
    assert changed.build_args() == base.build_args() == {}
    assert set(AppConfig(engine={"max_num_seqs": 8}).build_args()) == {"engine"}
    dep = application(changed)["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] == 3 and dep["max_ongoing_requests"] == 40
    assert dep["max_queued_requests"] == 10 and dep["graceful_shutdown_timeout_s"] == 5

def test_batching_stays_out_of_args_so_reconfigure_never_restarts():
    a, b = AppConfig(), AppConfig().with_overrides(**{"batching.max_batch_size": 32})
    assert a.build_args() == b.build_args()
    assert a.deployment_options()["user_config"] != b.deployment_options()["user_config"]


def test_gpu_and_autoscaling_options():
    cfg = AppConfig().with_overrides(**{
        "deployment.num_gpus": 0.5,
        "deployment.accelerator_type": "A10G",
        "deployment.autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4},
    })
    opts = cfg.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5, "accelerator_type": "A10G"}
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 4
    # A fixed count is autoscaling pinned to it, so turning autoscaling on or off is no code-version change.
    fixed = AppConfig().with_overrides(**{"deployment.num_replicas": 3}).deployment_options()["autoscaling_config"]
    assert fixed == {"min_replicas": 3, "max_replicas": 3, "initial_replicas": 3}
    ServeDeploySchema.model_validate(serve_config(cfg))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"batching.max_batch_size": 0}, "batching.max_batch_size"),
        ({"batching.max_batch_size": 999}, "less than or equal to 256"),
        ({"batching.batch_wait_timeout_s": -1}, "batching.batch_wait_timeout_s"),
        ({"deployment.num_gpus": 1.5}, "whole number"),
        ({"deployment.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) must be <= max_replicas (2)"),
        ({"engine.dtype": "int8"}, "engine.dtype"),
        ({"engine.mdoel_source": "x"}, "engine.mdoel_source: Extra inputs are not permitted"),
        ({"name": "Bad_Name"}, "name"),
    ],
)
def test_validation_errors_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        AppConfig().with_overrides(**overrides)
    assert fragment in str(e.value)


def test_bad_file_is_a_clear_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"batching": {"max_batch_size": "many"}}))
    with pytest.raises(ConfigError, match=r"batching\.max_batch_size"):
        AppConfig.from_file(p)


def test_build_app_takes_serve_run_style_dotted_args():
    from llmserve_nb.server.app import build_app

    app = build_app({"batching.max_batch_size": "4", "deployment.num_replicas": "2", "name": "x"})
    dep = app._bound_deployment
    assert dep.user_config == {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}
    scaling = dep._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 2)
    assert dep.max_ongoing_requests == 64 + 4
    with pytest.raises(ConfigError, match="deployment.num_replicas"):
        build_app({"deployment.num_replicas": "zero"})


def test_config_of_a_deployed_application_round_trips():
    cfg = AppConfig(name="chat").with_overrides(**{"batching.max_batch_size": 4, "deployment.num_gpus": 0.25})
    assert config_of_application(application(cfg)) == cfg
    pinned = cfg.with_overrides(**{
        "deployment.max_ongoing_requests": 20, "deployment.autoscaling": {"max_replicas": 3},
        "deployment.backpressure_status_code": 429, "deployment.retry_after_s": 7, "runtime_env": {"env_vars": {"A": "1"}},
        "deployment.request_timeout_s": 30,
    })
    assert config_of_application(application(pinned)) == pinned


# ---- the backend registry -------------------------------------------------------------------------
def test_the_registry_knows_every_backend_the_schema_allows():
    names = EngineConfig.model_fields["backend"].annotation.__args__
    assert tuple(b.name for b in all_backends()) == names == ("transformers", "vllm")
    assert isinstance(get_backend("transformers"), TransformersBackend)
    assert isinstance(backend_for(AppConfig(engine={"backend": "vllm"})), VllmBackend)
    assert len({b.import_path for b in all_backends()}) == len({b.metric_prefix for b in all_backends()}) == 2


def test_unknown_backend_and_import_path_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="unknown backend 'sglang'"):
        get_backend("sglang")
    with pytest.raises(ConfigError, match=r"application 'other' runs 'somebody\.else:app'"):
        config_of_application({"name": "other", "import_path": "somebody.else:app"})
    with pytest.raises(ConfigError, match="'somebody.else:app'"):
        backend_of_application({"import_path": "somebody.else:app"})
    assert backend_of_application({"import_path": "ray.serve.llm:build_openai_app"}) is get_backend("vllm")


def _vllm(**deployment) -> AppConfig:
    # A plain model dir and an explicit dtype: what the vLLM entry holds comes back field for field.
    return AppConfig(engine={"backend": "vllm", "model_source": "/models/Qwen2.5-0.5B-Instruct", "dtype": "float32"},
                     deployment=deployment)


@pytest.mark.parametrize("config", [
    AppConfig(deployment={"num_replicas": 3}),
    AppConfig(deployment={"autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3}}),
    AppConfig(deployment={"autoscaling": {"policy": "llm", "max_replicas": 2, "target_ttft_s": 0.5}}),
    AppConfig(deployment={"backpressure_status_code": 429, "retry_after_s": 9, "max_queued_requests": 5,
                          "health_check_timeout_s": 45, "graceful_shutdown_timeout_s": 7}),
    _vllm(num_replicas=3),
    _vllm(autoscaling={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3}),
    _vllm(backpressure_status_code=429, retry_after_s=9, max_queued_requests=5, health_check_timeout_s=45,
          graceful_shutdown_timeout_s=7, max_ongoing_requests=12),
], ids=lambda c: f"{c.engine.backend}")
def test_every_backend_reads_its_application_back(config):
    app = json.loads(json.dumps(application(config)))  # what Serve echoes is JSON
    assert backend_of_application(app) is backend_for(config)
    assert config_of_application(app) == config
    entry = next(d for d in app["deployments"] if d["name"] == backend_for(config).model_deployment(config))
    replicas = config.deployment.most_replicas
    assert entry["autoscaling_config"]["max_replicas"] == replicas


def test_pinned_replicas_and_real_autoscaling_render_alike_for_both_backends():
    for make in (lambda **d: AppConfig(deployment=d), _vllm):
        fixed, scaling = make(num_replicas=2), make(autoscaling={"min_replicas": 1, "max_replicas": 3})
        for cfg, want in ((fixed, {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}),
                          (scaling, {"min_replicas": 1, "max_replicas": 3})):
            backend = backend_for(cfg)
            entry = next(d for d in application(cfg)["deployments"] if d["name"] == backend.model_deployment(cfg))
            got = entry["autoscaling_config"]
            assert {k: got[k] for k in want} == want
            assert "num_replicas" not in entry


def test_options_one_backend_does_not_take_are_refused_at_render_time():
    """engine_kwargs are vLLM's; admission batches (and so the batch-size floor of max_ongoing_requests) are
    the transformers engine's. Each is refused by the backend it does not fit, not by the schema."""
    kwargs = AppConfig(engine={"engine_kwargs": {"enforce_eager": True}})
    with pytest.raises(ConfigError, match="engine_kwargs"):
        application(kwargs)
    small = AppConfig().with_overrides(**{"deployment.max_ongoing_requests": 2})
    with pytest.raises(ConfigError, match=r"max_ongoing_requests \(2\) is below batching\.max_batch_size \(8\)"):
        serve_config(small)
    vllm = small.with_overrides(**{"engine.backend": "vllm", "engine.model_source": "/models/Qwen2.5-0.5B-Instruct",
                                   "engine.engine_kwargs": {"enforce_eager": True}})
    assert application(vllm)["import_path"] == VllmBackend.import_path
    with pytest.raises(ConfigError, match="autoscaling.policy='llm' is not available with backend='vllm'"):
        application(vllm.with_overrides(**{"deployment.autoscaling": {"policy": "llm"}}))


def test_no_module_outside_backends_branches_on_a_backend_name():
    branch = re.compile(r"""[!=]=\s*["'](vllm|transformers)["']""")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py")) if "backends" not in path.relative_to(PACKAGE).parts
        for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)
    ]
    assert offenders == []


def test_deploy_refuses_a_cluster_a_rayservice_owns():
    from llmserve_nb.cluster import Cluster, DeployError

    c = Cluster("http://127.0.0.1:9", "http://127.0.0.1:9", kind="kuberay", how="test")
    c.managed_by = "llm"
    with pytest.raises(DeployError, match="RayService 'llm'.*would revert"):
        c.deploy(AppConfig())


def test_the_transformers_backend_reads_its_batch_from_stats_and_fails_a_burst_with_the_apps_error():
    import socket
    from types import SimpleNamespace

    with socket.socket() as s:  # a port nobody listens on: every request of the burst fails at once
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    stats = {"num_requests_running": 3, "num_requests_waiting": 5, "batch_size_histogram": {"1": 2}}
    app = SimpleNamespace(base_url=url, model="m", name="down", api_key=None, request_timeout_s=5.0,
                          stats=lambda: stats, unanswered_error=lambda call, cause: RuntimeError(f"{call}: {cause}"))
    backend = get_backend("transformers")
    assert backend.batch_sampler(app)() == {"running": 3, "waiting": 5}
    with pytest.raises(RuntimeError, match=rf"^burst of 2 requests to {url}: 2 failed, 0 unfinished \(connect"):
        backend.burst(app, n=2, max_tokens=4, input_tokens=8)
