"""LLM-aware autoscaling: the policy's arithmetic, its rendering, and a real scale-up on TTFT pressure."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmserve_nb import AppConfig
from llmserve_nb.autoscaling import PRESSURE_METRIC, llm_policy
from llmserve_nb.config import LLM_POLICY, config_of_application


def _ctx(pressures, current=2):
    return SimpleNamespace(aggregated_metrics={PRESSURE_METRIC: dict(enumerate(pressures))},
                           current_num_replicas=current)


def test_the_policy_asks_for_replicas_in_proportion_to_mean_pressure():
    assert llm_policy(_ctx([1.0, 1.0]))[0] == pytest.approx(2.0)  # on target: stay
    assert llm_policy(_ctx([3.0, 1.0]))[0] == pytest.approx(4.0)  # twice the target on average: double
    assert llm_policy(_ctx([0.2, 0.3]))[0] == pytest.approx(0.5)  # idle: Serve clamps to min_replicas


def test_the_policy_defers_to_serves_default_before_replicas_report(monkeypatch):
    import ray.serve.autoscaling_policy as ap

    monkeypatch.setattr(ap, "replica_queue_length_autoscaling_policy", lambda ctx: (7, {"default": True}))
    assert llm_policy(SimpleNamespace(aggregated_metrics={}, current_num_replicas=1)) == (7, {"default": True})


def test_policy_renders_as_a_serve_policy_and_targets_as_user_config():
    from ray.serve.schema import ServeDeploySchema

    cfg = AppConfig().with_overrides(**{"deployment.autoscaling": {"policy": "llm", "target_ttft_s": 0.5,
                                                                    "max_replicas": 3}})
    dep = cfg.to_application()["deployments"][0]
    assert dep["autoscaling_config"]["policy"] == {"policy_function": LLM_POLICY}
    assert "target_ttft_s" not in dep["autoscaling_config"]
    assert dep["user_config"]["autoscaling_targets"] == {"ttft_s": 0.5, "waiting_requests": 4.0}
    ServeDeploySchema.model_validate(cfg.to_serve_config())
    assert config_of_application(cfg.to_application()) == cfg
    # Tuning a target is an in-place (user_config) change; the app's code version does not move.
    tuned = cfg.with_overrides(**{"deployment.autoscaling.target_ttft_s": 1.0})
    assert tuned.build_args() == cfg.build_args()
    assert tuned.to_application()["deployments"][0]["autoscaling_config"] == dep["autoscaling_config"]


@pytest.mark.ray
def test_the_llm_policy_scales_up_on_ttft_pressure(cluster):
    """A TTFT target no replica can meet on 2 cores: the policy must ask for the second replica."""
    from llmserve_nb.autoscaling import scale_up_run

    cfg = AppConfig(name="autoscale-llm", route_prefix="/autoscale-llm").with_overrides(**{
        "deployment.num_cpus": 1,
        "deployment.autoscaling": {"policy": "llm", "target_ttft_s": 0.05, "min_replicas": 1, "max_replicas": 2,
                                   "upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 11},
    })
    report = scale_up_run(cluster, cfg, concurrency=8, seconds=45, max_tokens=32, progress=None)
    assert report["errors"] == 0 and report["completed"] > 0
    assert report["target_rose_s"] is not None, report["timeline"]
    assert report["max_running"] == 2
