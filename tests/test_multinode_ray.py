"""`connect(address=...)` against a real two-node Ray (head + worker via `ray start`, token auth on).

This is the path a notebook takes to a KubeRay cluster once it has the head service's address: dashboard REST
for nodes and deploys, the Serve proxy for requests. The worker carries a custom resource, so a replica that
asks for it must land there, as it would on a KubeRay worker group.
"""
from __future__ import annotations

import socket
import time

import httpx
import pytest
import ray

from llmserve_nb.cluster import Cluster, ClusterError, connect
from llmserve_nb.config import AppConfig
from ray_cluster import WORKER_RESOURCE, RayTestCluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def remote(ray_cluster: RayTestCluster):
    """The test cluster as a notebook sees it (named apart from conftest's embedded `cluster`)."""
    conn = connect(address=ray_cluster.dashboard_url, serve_url=ray_cluster.serve_url, token=ray_cluster.token)
    yield conn
    conn.shutdown()


def test_connect_sees_head_and_worker(remote: Cluster, ray_cluster: RayTestCluster):
    nodes = {n["node_id"]: n for n in remote.nodes()}
    assert set(nodes) == {ray_cluster.head_node_id[:12], ray_cluster.worker_node_id[:12]}
    head, worker = nodes[ray_cluster.head_node_id[:12]], nodes[ray_cluster.worker_node_id[:12]]
    assert head["head"] and not worker["head"]
    assert all(n["state"] == "ALIVE" and n["CPU"] == 1 and n["GPU"] == 0 for n in nodes.values())
    assert worker["custom"].get(WORKER_RESOURCE) == 1 and WORKER_RESOURCE not in head["custom"]
    assert remote.version()["ray_version"] == ray.__version__


@pytest.mark.parametrize(("token", "status"), [("not-the-cluster-token", 403), (None, 401)], ids=["wrong-token", "no-token"])
def test_bad_credentials_are_a_clear_cluster_error(ray_cluster: RayTestCluster, token, status, monkeypatch, tmp_path):
    # connect() falls back to the token Ray would use; make sure there is none to find.
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(ClusterError, match=rf"rejected our credentials \(HTTP {status}\).*token"):
        connect(address=ray_cluster.dashboard_url, serve_url=ray_cluster.serve_url, token=token)


def test_version_skew_is_refused_with_the_fix(ray_cluster: RayTestCluster, monkeypatch):
    real = ray.__version__
    # connect() reads this side's Ray from the installed distribution (importing ray takes seconds).
    monkeypatch.setattr("llmserve_nb.cluster.client._local_ray_version", lambda: ("2.59.0", "this kernel has ray {}"))
    with pytest.raises(ClusterError) as err:
        connect(address=ray_cluster.dashboard_url, serve_url=ray_cluster.serve_url, token=ray_cluster.token)
    msg = str(err.value)
    assert f"cluster runs ray {real}, this kernel has ray 2.59.0" in msg
    assert f"install ray[serve]=={real}" in msg
    # The escape hatch still connects.
    conn = connect(address=ray_cluster.dashboard_url, serve_url=ray_cluster.serve_url, token=ray_cluster.token,
                   check_version=False)
    conn.shutdown()


def test_dead_address_fails_fast_and_clearly():
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray dashboard at http://127.0.0.1:{port} .*ConnectError"):
        connect(address=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5.0


def test_deploy_pins_replica_to_worker_and_serves(remote: Cluster, ray_cluster: RayTestCluster):
    config = AppConfig().with_overrides(**{
        "deployment.resources": {WORKER_RESOURCE: 0.01}, "deployment.num_cpus": 0.5,
        "batching.max_batch_size": 2,
    })
    handle = remote.deploy(config, timeout_s=600)
    try:
        [row] = [r for r in remote.applications() if r["app"] == config.name]
        assert row["app_status"] == "RUNNING" and row["running_replicas"] == 1
        assert row["nodes"] == [ray_cluster.worker_node_id[:12]], f"replica not on the worker node: {row}"

        answer = handle.chat("What is the capital of France?", max_tokens=32)
        assert "Paris" in answer, answer
        r = httpx.post(f"{handle.base_url}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 8},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"].strip()
    finally:
        handle.shutdown()
    assert remote.app_status(config.name) is None
