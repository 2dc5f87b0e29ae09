"""Ray's cluster autoscaler with the fake multi-node provider: the config (no Ray), and notebook 06 end to end."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from llmserve_nb.backends import backend_for
from llmserve_nb.cluster import Cluster, ClusterError
from llmserve_nb.config import AppConfig
from llmserve_nb.experiments.cluster_autoscaling import (
    HEAD_NODE_TYPE,
    WORKER_NODE_TYPE,
    LocalAutoscalingCluster,
    autoscaling_config,
    cluster_processes,
    cluster_sampler,
    correspondence,
    kuberay_autoscaling_config,
    stop_processes,
)


def test_config_passes_rays_validator():
    from ray.autoscaler._private.util import validate_config

    config = autoscaling_config("127.0.0.1:41234", head_cpus=1, worker_cpus=2, max_workers=3, idle_timeout_s=15)
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["gcs_address"] == "127.0.0.1:41234"
    # Every node has this machine's IP: without it the autoscaler mixes the nodes up and never launches.
    assert config["provider"]["use_node_id_as_ip"] is True
    assert config["head_node_type"] == HEAD_NODE_TYPE == "ray.head.default"  # the name the fake provider uses
    assert config["idle_timeout_minutes"] == pytest.approx(0.25)
    head, worker = config["available_node_types"][HEAD_NODE_TYPE], config["available_node_types"][WORKER_NODE_TYPE]
    assert head["max_workers"] == 0 and head["resources"]["CPU"] == 1
    assert worker["resources"]["CPU"] == 2 and worker["min_workers"] == 0 and worker["max_workers"] == 3
    assert config["max_workers"] == 3


@pytest.mark.parametrize("kwargs", [
    {"min_workers": 3, "max_workers": 2}, {"worker_cpus": 0}, {"head_cpus": -1}, {"idle_timeout_s": -1},
])
def test_config_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        autoscaling_config("127.0.0.1:1", **kwargs)


def test_local_config_matches_what_kuberay_derives_from_the_rendered_raycluster():
    """The worker group this package renders for KubeRay and the local worker type say the same thing."""
    kuberay = kuberay_autoscaling_config()
    assert kuberay["provider"]["type"] == "kuberay"
    local = autoscaling_config("127.0.0.1:1", head_cpus=0, worker_cpus=2, max_workers=2, idle_timeout_s=120)
    rows = {r["setting"]: r for r in correspondence(local, kuberay)}
    for setting in ("idle_timeout_minutes", "max_workers (all types)", "head node type: CPU",
                    f"{WORKER_NODE_TYPE}: min_workers", f"{WORKER_NODE_TYPE}: max_workers", f"{WORKER_NODE_TYPE}: CPU"):
        assert rows[setting]["local"] == rows[setting]["kuberay"], rows[setting]
    assert "workerGroupSpecs[groupName=cpu-workers].maxReplicas" in rows[f"{WORKER_NODE_TYPE}: max_workers"]["RayCluster field"]


def test_a_long_temp_dir_is_refused_before_anything_starts(tmp_path):
    # Ray's unix socket paths under the temp dir must stay below ~107 bytes.
    lac = LocalAutoscalingCluster(temp_dir=tmp_path / ("x" * 60))
    with pytest.raises(ClusterError, match="too long"):
        lac.start()
    assert lac.temp_dir is None and lac.processes() == []


def test_the_sampler_counts_nodes_and_the_replicas_on_worker_nodes():
    config = AppConfig()

    class TwoNodes(LocalAutoscalingCluster):
        def nodes(self):
            return [{"node_id": "head", "head": True, "node_type": HEAD_NODE_TYPE, "CPU": 1},
                    {"node_id": "w1", "head": False, "node_type": WORKER_NODE_TYPE, "CPU": 1}]

    class ThreeReplicas(Cluster):
        """Serve wants 3 replicas: one runs on the head, one on the worker, one still starts there."""

        def serve_details(self):
            replicas = [{"replica_id": "a", "state": "RUNNING", "node_id": "head"},
                        {"replica_id": "b", "state": "RUNNING", "node_id": "w1"},
                        {"replica_id": "c", "state": "STARTING", "node_id": "w1"}]
            deployment = backend_for(config).model_deployment(config)
            return {"applications": {config.name: {"status": "RUNNING", "deployments": {
                deployment: {"status": "UPSCALING", "target_num_replicas": 3, "replicas": replicas}}}}}

    serve = ThreeReplicas("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
    assert cluster_sampler(TwoNodes(), serve, config)() == {
        "nodes": 2, "worker_nodes": 1, "running_replicas": 2, "target_replicas": 3, "replicas_on_workers": 1}
    # Before the deploy (or after the delete) Serve does not know the app: no replicas, no target.
    assert cluster_sampler(TwoNodes(), serve, config.with_overrides(name="other"))() == {
        "nodes": 2, "worker_nodes": 1, "running_replicas": 0, "target_replicas": 0, "replicas_on_workers": 0}


@pytest.mark.ray
@pytest.mark.notebook
def test_notebook_nodes_follow_replicas_up_and_down(tmp_path):
    from llmserve_nb.notebooks import read_results, run_notebook

    # The test owns the temp dir, so it can stop the cluster's processes (and only those) whatever the
    # notebook did; a short one under /tmp, for Ray's socket paths.
    temp_dir = Path(tempfile.mkdtemp(prefix="lsnb-as-", dir="/tmp"))
    try:
        out = run_notebook("06_cluster_autoscaling", tmp_path,
                           {"temp_dir": str(temp_dir), "idle_timeout_s": 8, "sample_interval_s": 1.0}, html=False)
        res = read_results(out)
    finally:
        left = cluster_processes(temp_dir)
        stop_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the notebook left {len(left)} processes of its cluster running"
    s, rows = res["summary"], res["timeline"]
    # Nodes rose from 1 while replicas rose past what the head holds...
    assert s["nodes_before"] == 1 and s["replicas_before"] == 1, s
    assert s["nodes_peak"] == 2 and s["replicas_peak"] == 2, s
    # ...the extra replica ran on the added node...
    assert s["replicas_on_workers_before"] == 0 and s["replicas_on_workers_peak"] == 1, s
    assert any(r["nodes"] == 2 and r["replicas_on_workers"] == 1 and r["running_replicas"] == 2 for r in rows), rows
    assert 0 < s["s_to_node_added"] <= s["s_to_replica_running"], s
    # ...and the idle node went away after the scale-down, no sooner than the idle timeout.
    assert s["nodes_after"] == 1 and s["replicas_after"] == 1, s
    assert s["s_node_idle_before_removed"] >= 8 - 2, s  # minus the sampling and autoscaler tick granularity
    settings = {r["setting"] for r in res["kuberay_correspondence"]}
    assert f"{WORKER_NODE_TYPE}: max_workers" in settings
