"""AppConfig: validation errors, round trips, and the configs it renders (checked by Ray's own schema)."""
from __future__ import annotations

import json

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from llmserve_nb.config import DEPLOYMENT_NAME, IMPORT_PATH, AppConfig, ConfigError


def test_defaults_render_a_serve_config_ray_accepts():
    cfg = AppConfig()
    doc = cfg.to_serve_config(http_host="127.0.0.1", http_port=8123)
    schema = ServeDeploySchema.model_validate(doc)  # Ray's own schema for serve deploy / REST / RayService
    app = schema.applications[0]
    assert app.import_path == IMPORT_PATH
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
    from llmserve_nb.config import config_of_application

    assert config_of_application(cfg.to_application()) == cfg


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
    dep = changed.to_application()["deployments"][0]
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
    ServeDeploySchema.model_validate(cfg.to_serve_config())


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"batching.max_batch_size": 0}, "batching.max_batch_size"),
        ({"batching.max_batch_size": 999}, "less than or equal to 256"),
        ({"batching.batch_wait_timeout_s": -1}, "batching.batch_wait_timeout_s"),
        ({"deployment.num_gpus": 1.5}, "whole number"),
        ({"deployment.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas (3) must be <= max_replicas (2)"),
        ({"deployment.max_ongoing_requests": 2}, "could never fill a batch"),
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
    from llmserve_nb.config import config_of_application

    cfg = AppConfig(name="chat").with_overrides(**{"batching.max_batch_size": 4, "deployment.num_gpus": 0.25})
    assert config_of_application(cfg.to_application()) == cfg
    pinned = cfg.with_overrides(**{
        "deployment.max_ongoing_requests": 20, "deployment.autoscaling": {"max_replicas": 3},
        "deployment.backpressure_status_code": 429, "deployment.retry_after_s": 7, "runtime_env": {"env_vars": {"A": "1"}},
        "deployment.request_timeout_s": 30,
    })
    assert config_of_application(pinned.to_application()) == pinned
    with pytest.raises(ConfigError, match="not llmserve_nb.server.app:build_app"):
        config_of_application({"name": "other", "import_path": "somebody.else:app"})


def test_deploy_refuses_a_cluster_a_rayservice_owns():
    from llmserve_nb.cluster import Cluster, DeployError

    c = Cluster("http://127.0.0.1:9", "http://127.0.0.1:9", kind="kuberay", how="test")
    c.managed_by = "llm"
    with pytest.raises(DeployError, match="RayService 'llm'.*would revert"):
        c.deploy(AppConfig())
