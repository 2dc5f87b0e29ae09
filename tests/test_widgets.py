"""ServeTuner against the real app of the test session: widgets -> AppConfig -> live Serve reconfigure."""
from __future__ import annotations

import pytest

from llmserve_nb import AppConfig, AppHandle, Cluster
from llmserve_nb.backends import application
from llmserve_nb.widgets import ServeTuner

# Tests that take the session's `app` fixture start a real Ray (marked `ray`); the others are fast.


@pytest.mark.ray
def test_widgets_describe_a_valid_config(app):
    t = ServeTuner(app)
    assert t.max_batch_size.value == app.config.batching.max_batch_size
    t.set(max_batch_size=3, batch_wait_timeout_s=0.01)
    cfg = t.config()
    assert cfg.batching.max_batch_size == 3 and cfg.deployment.autoscaling is None
    t.set(autoscaling=True, replicas=(1, 3), target_ongoing_requests=4.0)
    auto = t.config().deployment.autoscaling
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4.0)
    assert not t.target_ongoing_requests.disabled
    with pytest.raises(ValueError, match="no tuner control named 'nope'"):
        t.set(nope=1)


@pytest.mark.ray
def test_apply_button_reconfigures_the_running_replica(app):
    original = app.config
    before = app.stats()
    t = ServeTuner(app)
    try:
        t.set(max_batch_size=5, batch_wait_timeout_s=0.03)
        t.apply_button.click()
        after = app.stats()
        assert after["replica"] == before["replica"]  # reconfigured in place, not replaced
        assert after["batching"] == {"max_batch_size": 5, "batch_wait_timeout_s": 0.03}
        assert "max_batch_size=5," in t.status.value and "applied" in t.status.value
    finally:
        app.update(original)


@pytest.mark.ray
def test_load_runs_in_the_background_and_records_history(app):
    t = ServeTuner(app)
    t.run_load(concurrency=2, seconds=3, wait=True, max_tokens=8)
    # About one sample a second while the 2 users load it, and one after the load ended.
    assert 3 <= len(t.history) <= 6 and all(s.running == 1 and s.target == 1 for s in t.history)
    assert [s.ongoing for s in t.history] == [2] * (len(t.history) - 1) + [0]
    assert "load done:" in t.load_status.value and "errors" not in t.load_status.value
    assert "color:#b00" not in t.load_status.value
    assert t.last_load["completed"] > 0 and t.last_load["errors"] == 0, t.last_load
    # One replica throughout (no autoscaling): no scale-up decided, none seen.
    assert (t.last_load["scale_up_decided_s"], t.last_load["scale_up_s"], t.last_load["policy"]) == (None, None, None)


def test_background_load_errors_show_in_the_load_line():
    dead = Cluster("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
    t = ServeTuner(AppHandle(dead, AppConfig()))
    t.run_load(concurrency=2, seconds=1, wait=True, max_tokens=4)
    line = t.load_status.value
    assert "color:#b00" in line and "errors (e.g. connect:" in line, line
    assert t.load_status in t.widget.children


def test_a_crash_of_the_load_thread_shows_in_the_load_line(monkeypatch):
    import llmserve_nb.experiments.autoscaling

    def broken(*args, **kwargs):
        raise RuntimeError("the load generator broke")

    monkeypatch.setattr(llmserve_nb.experiments.autoscaling, "run_benchmark", broken)
    dead = Cluster("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
    t = ServeTuner(AppHandle(dead, AppConfig()))
    t.run_load(concurrency=1, seconds=1, wait=True)
    assert "load failed: RuntimeError: the load generator broke" in t.load_status.value
    assert "color:#b00" in t.load_status.value


def test_a_dead_cluster_shows_in_the_status_line_instead_of_raising():
    dead = Cluster("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
    t = ServeTuner(AppHandle(dead, AppConfig()))
    assert "cannot reach the Ray dashboard" in t.status.value
    t.apply_button.click()
    assert "ClusterError" in t.status.value and "color:#b00" in t.status.value


class _ServeDetailsOnly(Cluster):
    """A cluster whose Serve reports one app (`deployment` plus an ingress, one replica each) and nothing else."""

    def __init__(self, app_name: str, deployment: str):
        super().__init__("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
        self.details = {"applications": {app_name: {"status": "RUNNING", "deployments": {
            deployment: {"status": "HEALTHY", "target_num_replicas": 1,
                         "replicas": [{"replica_id": "r1", "state": "RUNNING"}]},
            "OpenAiIngress": {"status": "HEALTHY", "target_num_replicas": 1,
                              "replicas": [{"replica_id": "i1", "state": "RUNNING"}]},
        }}}}

    def serve_details(self):
        return self.details


def test_vllm_app_disables_batching_with_a_note_and_keeps_autoscaling():
    from llmserve_nb.backends import backend_for
    from llmserve_nb.config import EngineConfig

    cfg = AppConfig(engine=EngineConfig(backend="vllm", max_num_seqs=16))
    deployment = backend_for(cfg).model_deployment(cfg)
    app = AppHandle(_ServeDetailsOnly(cfg.name, deployment), cfg)
    t = ServeTuner(app)
    assert t.deployment == "LLMServer:SmolLM2-135M-Instruct" and not t.live_batching
    assert t.max_batch_size.disabled and t.batch_wait_timeout_s.disabled
    assert not t.autoscaling.disabled and not t.replicas.disabled
    assert t.batching_note in t.widget.children
    assert "not adjustable on a vLLM app" in t.batching_note.value and "max_num_seqs=16" in t.batching_note.value
    # The replica history and status line read the LLMServer deployment, not the transformers one.
    assert "1 running / target 1" in t.status.value and "vLLM engine" in t.status.value
    assert t.wait_for_replicas(1, timeout_s=1) == 1 and t.history[-1].running == 1
    # A batching change is declined with the note, not an error; autoscaling changes go through.
    t.set(max_batch_size=3, autoscaling=True, replicas=(1, 3), target_ongoing_requests=4.0)
    assert t.max_batch_size.value == cfg.batching.max_batch_size and "max_batch_size=3 ignored" in t.notes[0]
    new = t.config()
    assert new.batching == cfg.batching
    auto = new.deployment.autoscaling
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4.0)
    sent = []
    app.update = lambda config, **kw: sent.append(config)
    got = t.apply_batching(max_batch_size=2)
    assert got["batching"] is None and got["replica_kept"] is True and "continuously" in got["note"]
    assert sent and sent[-1].deployment.autoscaling.max_replicas == 3
    assert t.replica_ids() == ["r1"]


def test_policy_targets_are_tuner_controls_and_change_in_place():
    cfg = AppConfig().with_overrides(**{"deployment.autoscaling": {"policy": "llm", "max_replicas": 2}})
    app = AppHandle(_ServeDetailsOnly(cfg.name, "LLMServer"), cfg)
    t = ServeTuner(app)
    assert t.policy.value == "llm" and t.policy in t.widget.children
    # Only the active policy's targets are live controls.
    assert t.target_ongoing_requests.disabled and not t.target_ttft_s.disabled and not t.target_waiting_requests.disabled
    t.set(target_ttft_s=0.7, target_waiting_requests=2.0)
    tuned = t.config()
    auto = tuned.deployment.autoscaling
    assert (auto.policy, auto.target_ttft_s, auto.target_waiting_requests) == ("llm", 0.7, 2.0)
    # A target change moves only user_config: Serve applies it without restarting a replica.
    before, after = application(cfg)["deployments"][0], application(tuned)["deployments"][0]
    assert tuned.build_args() == cfg.build_args()
    assert before["autoscaling_config"] == after["autoscaling_config"]
    assert after["user_config"]["autoscaling_targets"] == {"ttft_s": 0.7, "waiting_requests": 2.0}
    # Switching the policy is a restart, and the status line says so before Apply.
    t.set(policy="ongoing_requests")
    assert not t.target_ongoing_requests.disabled and t.target_ttft_s.disabled
    assert "restarts the replicas" in t.status.value
    assert t.config().deployment.autoscaling.policy == "ongoing_requests"


def test_a_vllm_app_offers_only_serves_default_policy():
    from llmserve_nb.config import EngineConfig

    cfg = AppConfig(engine=EngineConfig(backend="vllm"))
    t = ServeTuner(AppHandle(_ServeDetailsOnly(cfg.name, "LLMServer:SmolLM2-135M-Instruct"), cfg))
    assert list(t.policy.options) == ["ongoing_requests"]


def test_scale_up_is_the_first_rise_of_the_target_then_of_the_running_replicas():
    """The one computation behind `ServeTuner.last_load`, `scale_up_run` and the policy comparison."""
    from llmserve_nb.experiments.autoscaling import scale_up_times

    # (seconds, running, target): Serve decides at 12.5 s, the second replica serves at 20.2 s.
    counts = [(10.0, 1, 1), (11.0, 1, 1), (12.5, 1, 2), (13.0, 1, 2), (20.2, 2, 2)]
    assert scale_up_times(counts) == {"scale_up_decided_s": 2.5, "scale_up_s": 10.2}
    assert scale_up_times(counts[:2]) == {"scale_up_decided_s": None, "scale_up_s": None}
    # A Serve that reports no target: the decision is unknown, the running replicas still tell.
    assert scale_up_times([(0.0, 1, None), (1.0, 2, None)]) == {"scale_up_decided_s": None, "scale_up_s": 1.0}
    assert scale_up_times([]) == {"scale_up_decided_s": None, "scale_up_s": None}
