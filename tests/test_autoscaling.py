"""LLM-aware autoscaling: the policy's arithmetic, its rendering and the comparison table. The real
scale-up on TTFT pressure is run by notebook 02 (tests/test_notebook_tune.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmserve_nb import AppConfig
from llmserve_nb.backends import application, config_of_application, serve_config
from llmserve_nb.config import LLM_POLICY
from llmserve_nb.server.autoscaling_policy import PRESSURE_METRIC, llm_policy


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
    dep = application(cfg)["deployments"][0]
    assert dep["autoscaling_config"]["policy"] == {"policy_function": LLM_POLICY}
    assert "target_ttft_s" not in dep["autoscaling_config"]
    assert dep["user_config"]["autoscaling_targets"] == {"ttft_s": 0.5, "waiting_requests": 4.0}
    ServeDeploySchema.model_validate(serve_config(cfg))
    assert config_of_application(application(cfg)) == cfg
    # Tuning a target is an in-place (user_config) change; the app's code version does not move.
    tuned = cfg.with_overrides(**{"deployment.autoscaling.target_ttft_s": 1.0})
    assert tuned.build_args() == cfg.build_args()
    assert application(tuned)["deployments"][0]["autoscaling_config"] == dep["autoscaling_config"]


def test_policy_comparison_is_one_row_per_policy_of_the_load_summaries():
    from llmserve_nb.experiments.autoscaling import POLICY_COLUMNS, policy_comparison

    llm = {"scale_up_decided_s": 3.0, "scale_up_s": 7.5, "ttft_ms_p50": 300.0, "ttft_ms_p99": 900.0,
           "output_tok_per_s": 80.0, "completed": 40, "errors": 0}
    default = {"scale_up_decided_s": 6.0, "scale_up_s": 12.0, "ttft_ms_p50": 500.0, "ttft_ms_p99": 2000.0,
               "output_tok_per_s": 70.0, "completed": 35, "errors": 0, "duration_s": 60.0}
    table = policy_comparison({"llm": llm, "ongoing_requests": default, "none": {"scale_up_s": None}})
    assert list(table.index) == ["llm", "ongoing_requests", "none"] and list(table.columns) == list(POLICY_COLUMNS)
    assert table.loc["llm", "scale_up_s"] == 7.5 and table.loc["ongoing_requests", "scale_up_decided_s"] == 6.0
    assert table.loc["ongoing_requests", "ttft_ms_p99"] == 2000.0
    assert table.loc["none"].isna().all()  # no scale-up and nothing measured: empty, not invented
