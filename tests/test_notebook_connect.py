"""notebooks/01_connect_cluster.ipynb through papermill: against the embedded default and a real two-node Ray.

Results come back from the `results` cell's application/json output. (nbval's re-run lives in the
quickstart's test, where a greedy answer gives it an output worth comparing.)
"""
from __future__ import annotations

from pathlib import Path

import httpx
import nbformat
import pytest

from llmserve_nb import k8s
from llmserve_nb.notebooks import read_results, run_notebook
from ray_cluster import WORKER_RESOURCE, RayTestCluster


pytestmark = pytest.mark.notebook


def _run(out_dir: Path, **params) -> Path:
    return run_notebook("01_connect_cluster", out_dir, params, html=False)


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _rendered_objects() -> list[dict]:
    # The notebook validates the rendered k8s/ tree plus one RayService carrying its own config.
    docs = [d for docs in k8s.render_manifests().values() for d in docs]
    return [k8s.cpu_rayservice()] + [d for d in docs if isinstance(d, dict) and "apiVersion" in d]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("nb01-local"))


def test_local_embedded_ray(local_run: Path):
    results = read_results(local_run)
    assert results["target"] == "local"
    assert results["nodes"] == 1 and results["cpus"] >= 1 and results["gpus"] == 0
    assert results["app_nodes"] == results["node_ids"]
    assert "Paris" in results["answer"], results["answer"]
    assert results["manifest_errors"] == [] and results["manifests_not_validated"] == []
    assert results["manifests_validated"] == len(_rendered_objects())
    # Batching tuned live on the same replica, then a short benchmark that fails nothing.
    assert results["tuned"]["same_replicas"] is True, results["tuned"]
    assert 1 < results["tuned"]["burst"]["max_batch_size_seen"] <= results["tuned"]["max_batch_size"], results["tuned"]
    assert [r["concurrency"] for r in results["benchmark"]] == [1, 4]
    assert all(r["errors"] == 0 and r["completed"] > 0 and r["output_tok_per_s"] > 0 for r in results["benchmark"])


@pytest.mark.ray
def test_address_target_on_two_node_cluster_without_crds(ray_cluster: RayTestCluster, tmp_path):
    executed = _run(
        tmp_path, target="address", address=ray_cluster.dashboard_url, serve_url=ray_cluster.serve_url,
        token=ray_cluster.token, overrides={"deployment.resources": {WORKER_RESOURCE: 0.01}, "deployment.num_cpus": 0.5},
        crds=str(tmp_path / "no-crds-here"), benchmark_concurrency=[],
    )
    results = read_results(executed)
    assert results["target"] == "address"
    assert results["nodes"] == 2 and results["cpus"] == 2
    assert sorted(results["node_ids"]) == sorted([ray_cluster.head_node_id[:12], ray_cluster.worker_node_id[:12]])
    assert results["app_nodes"] == [ray_cluster.worker_node_id[:12]], "the replica ignored its node2 resource"
    assert "Paris" in results["answer"], results["answer"]

    # Without CRDs the custom resources are reported, not validated; the core kinds still are.
    objects = _rendered_objects()
    custom_groups = ("ray.io/", "gateway.networking.k8s.io/", "monitoring.coreos.com/")
    ray_objects = [o for o in objects if o["apiVersion"].startswith(custom_groups)]
    assert sorted((r["kind"], r["name"]) for r in results["manifests_not_validated"]) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in ray_objects
    )
    assert results["manifests_validated"] == len(objects) - len(ray_objects)
    assert results["manifest_errors"] == []
    assert "custom resources were rendered but not validated" in _stream_text(nbformat.read(executed, as_version=4))

    # The teardown cell removed the app it deployed.
    apps = httpx.get(f"{ray_cluster.dashboard_url}/api/serve/applications/",
                     headers={"Authorization": f"Bearer {ray_cluster.token}"}, timeout=30).json()
    assert not apps.get("applications"), apps.get("applications")
