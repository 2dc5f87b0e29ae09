"""The rendered k8s/ tree: valid against the KubeRay CRDs and Kubernetes schemas, committed == rendered,
serveConfigV2 == AppConfig.to_serve_config(), and the CPU overlay's patches produce the CPU RayService.

The overlay check applies the JSON6902 patches in this file (and, when kubectl is on PATH, also compares
with `kubectl kustomize`), so it tests the patches themselves, not just the files' structure.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmserve_nb import k8s

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


@pytest.fixture(scope="module")
def crds() -> Path:
    d = k8s.crd_dir()
    if not (d / "ray.io_rayservices.yaml").exists() or not (d / "ray.io_rayclusters.yaml").exists():
        pytest.skip(
            f"KubeRay CRDs not found in {d}: set {k8s.CRD_ENV}=DIR with ray.io_rayservices.yaml and "
            "ray.io_rayclusters.yaml (`kubectl get crd rayservices.ray.io -o yaml > DIR/ray.io_rayservices.yaml`)"
        )
    return d


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return k8s.render_manifests()


def _objects(rendered):
    return [(rel, d) for rel, docs in rendered.items() for d in docs if isinstance(d, dict) and "apiVersion" in d]


def _gpu_service(rendered) -> dict:
    return copy.deepcopy(rendered["base/rayservice-gpu.yaml"][0])


def test_every_rendered_object_validates(crds, rendered):
    objs = _objects(rendered)
    kinds = {d["kind"] for _, d in objs}
    assert {
        "RayService",
        "RayCluster",
        "NetworkPolicy",
        "Secret",
        "Namespace",
        "HorizontalPodAutoscaler",
        "Deployment",
        "Kustomization",
    } <= kinds
    errors = {
        f"{rel}:{d['kind']}/{d['metadata'].get('name') if 'metadata' in d else ''}": k8s.validate_manifest(d, crds=crds)
        for rel, d in objs
    }
    assert {k: v for k, v in errors.items() if v} == {}


def test_committed_tree_equals_fresh_render():
    problems = k8s.check_manifests(K8S)
    assert not problems, "k8s/ drifted; run `llmserve-nb render-k8s`:\n" + "".join(problems)


def test_committed_tree_validates_including_kustomize_references(crds):
    assert k8s.validate_files([K8S], crds=crds) == []


def test_serve_config_v2_is_the_yaml_of_to_serve_config(rendered):
    for rel, name, prof in [
        ("base/rayservice-gpu.yaml", "llm", "gpu"),
        ("rayservice-fractional-gpu.yaml", "llm-half", "gpu-half"),
        ("rayservice-fractional-gpu.yaml", "llm-quarter", "gpu-quarter"),
    ]:
        svc = next(d for d in rendered[rel] if d["metadata"]["name"] == name)
        text = svc["spec"]["serveConfigV2"]
        assert text == yaml.safe_dump(k8s.profile(prof).to_serve_config(), sort_keys=False)
        assert yaml.safe_load(text) == k8s.profile(prof).to_serve_config()
    committed = yaml.safe_load((K8S / "base" / "rayservice-gpu.yaml").read_text())
    assert yaml.safe_load(committed["spec"]["serveConfigV2"]) == k8s.profile("gpu").to_serve_config()


def test_gpu_profile_asks_one_gpu_per_replica(rendered):
    dep = yaml.safe_load(_gpu_service(rendered)["spec"]["serveConfigV2"])["applications"][0]["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == 1.0
    worker = _gpu_service(rendered)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


@pytest.mark.parametrize(
    "name, gpus, batch, replicas, dynamic", [("llm-half", 0.5, 4, 2, False), ("llm-quarter", 0.25, 8, 4, True)]
)
def test_fractional_gpu_variants_pack_one_gpu(rendered, name, gpus, batch, replicas, dynamic):
    svc = next(d for d in rendered["rayservice-fractional-gpu.yaml"] if d["metadata"]["name"] == name)
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    dep = app["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == gpus
    assert dep["user_config"]["max_batch_size"] == batch
    assert (dep["user_config"]["batch_wait_timeout_s"] > 0) is dynamic
    assert dep["num_replicas"] == replicas
    assert gpus * replicas == 1.0  # the replicas exactly fill the one GPU a worker pod requests
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_raycluster_has_in_tree_autoscaling_and_gpu_group(rendered):
    rc = rendered["raycluster-notebook.yaml"][0]["spec"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == "2.60.0"
    group = rc["workerGroupSpecs"][0]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("gpu-workers", 1, 4)
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def _pod_specs(node):
    if isinstance(node, dict):
        if "containers" in node:
            yield node
        for v in node.values():
            yield from _pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pod_specs(v)


def test_every_pod_runs_non_root_without_privileges(rendered):
    pods = list(_pod_specs([d for _, d in _objects(rendered)]))
    assert len(pods) >= 5
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_network_policy_limits_head_and_serve_ports(rendered):
    rules = rendered["base/networkpolicy.yaml"][0]["spec"]["ingress"]
    limited = [sorted(p["port"] for p in r["ports"]) for r in rules if "ports" in r]
    assert [6379, 8000, 8265, 10001] in limited
    assert all(
        ("ports" in r) or r["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llmserve-nb"}}}]
        for r in rules
    )


def test_api_key_secret_is_a_marked_placeholder(rendered):
    secret = rendered["base/api-key-secret.yaml"][0]
    assert "placeholder" in secret["stringData"]["api-key"] and "REPLACE" in secret["stringData"]["api-key"]


def test_pods_get_the_api_key_under_the_name_serve_app_reads(rendered):
    from llmserve_nb.serve_app import API_KEY_ENV

    head = rendered["base/rayservice-gpu.yaml"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    env = head["template"]["spec"]["containers"][0]["env"]
    assert {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "llmserve-api-key", "key": "api-key"}}} in env


def test_hpa_is_opt_in_and_uses_metrics_ray_exports(rendered):
    import ray

    base = rendered["base/kustomization.yaml"][0]["resources"]
    assert not any("hpa" in r for r in base)
    query = rendered["optional/hpa/prometheus-adapter-values.yaml"][0]["rules"]["external"][0]["metricsQuery"]
    ray_src = "".join(p.read_text() for p in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"))
    for metric in ("serve_deployment_queued_queries", "serve_num_ongoing_requests_at_replicas"):
        assert f"ray_{metric}" in query and f'"{metric}"' in ray_src
    hpa = rendered["optional/hpa/hpa.yaml"][0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == rendered["optional/hpa/ray-gpu-workers.yaml"][0]["metadata"]["name"]
    assert "HPA" in (K8S / "README.md").read_text() and "running" in (K8S / "README.md").read_text()


# ---- the CPU overlay -----------------------------------------------------------------------------
def _json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(leaf) if isinstance(node, list) else leaf
        if op["op"] == "replace":
            assert (key < len(node)) if isinstance(node, list) else (key in node), f"replace of missing {op['path']}"
            node[key] = op["value"]
        elif op["op"] == "add":
            node.insert(key, op["value"]) if isinstance(node, list) else node.__setitem__(key, op["value"])
        elif op["op"] == "remove":
            del node[key]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def test_cpu_overlay_refers_to_existing_files():
    kz = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    assert (K8S / "overlays" / "cpu" / kz["resources"][0] / "kustomization.yaml").is_file()
    for patch in kz["patches"]:
        assert (K8S / "overlays" / "cpu" / patch["path"]).is_file()


def test_cpu_overlay_patches_produce_the_cpu_rayservice(crds):
    kz = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    base_dir = K8S / "overlays" / "cpu" / kz["resources"][0]
    base_files = yaml.safe_load((base_dir / "kustomization.yaml").read_text())["resources"]
    target = kz["patches"][0]["target"]
    services = [
        d
        for f in base_files
        for d in yaml.safe_load_all((base_dir / f).read_text())
        if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
    ]
    assert len(services) == 1
    ops = yaml.safe_load((K8S / "overlays" / "cpu" / kz["patches"][0]["path"]).read_text())
    patched = _json6902(services[0], ops)
    assert patched == k8s.cpu_rayservice()
    assert k8s.validate_manifest(patched, crds=crds) == []
    serve = yaml.safe_load(patched["spec"]["serveConfigV2"])
    assert serve == k8s.profile("cpu").to_serve_config()
    assert serve["applications"][0]["args"].get("engine", {}).get("model_source", "smollm2") == "smollm2"
    assert "num_gpus" not in serve["applications"][0]["deployments"][0]["ray_actor_options"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(patched) and "tolerations" not in yaml.safe_dump(patched)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not on PATH")
def test_kubectl_kustomize_builds_the_same_cpu_rayservice():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / "cpu")], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    services = [d for d in yaml.safe_load_all(out) if d["kind"] == "RayService"]
    assert services == [k8s.cpu_rayservice()]


# ---- validation catches what the API server (or Serve) would reject ------------------------------
def _one(errors: list[str], *needles: str) -> str:
    hits = [e for e in errors if all(n in e for n in needles)]
    assert hits, f"no error containing {needles} in {errors}"
    return hits[0]


def test_unknown_field_is_reported_with_its_path(crds, rendered):
    svc = _gpu_service(rendered)
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    _one(k8s.validate_manifest(svc, crds=crds), "spec.rayClusterConfig.headGroupSpec:", "'rayStartParms'", "unknown")


def test_wrong_type_is_reported_with_its_path(crds, rendered):
    svc = _gpu_service(rendered)
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["memory"] = ["8Gi"]
    _one(
        k8s.validate_manifest(svc, crds=crds),
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits.memory",
    )


def test_missing_required_field_is_reported_and_defaulted_ones_are_not(crds, rendered):
    svc = _gpu_service(rendered)
    group = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    del group["minReplicas"]  # has a CRD default, so the API server accepts it
    group["replicas"] = None  # nulls are dropped like the API server prunes them
    assert k8s.validate_manifest(svc, crds=crds) == []
    del group["groupName"]
    _one(k8s.validate_manifest(svc, crds=crds), "spec.rayClusterConfig.workerGroupSpecs[0]", "'groupName'")


def test_int32_overflow_is_rejected(crds, rendered):
    svc = _gpu_service(rendered)
    svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40
    _one(k8s.validate_manifest(svc, crds=crds), "workerGroupSpecs[0].maxReplicas")


def test_bad_serve_config_v2_is_reported_by_rays_schema(crds, rendered):
    svc = _gpu_service(rendered)
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] = "lots"
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    _one(
        k8s.validate_manifest(svc, crds=crds), "spec.serveConfigV2.applications[0].deployments[0].max_ongoing_requests"
    )
    svc["spec"]["serveConfigV2"] = "applications: [unclosed"
    _one(k8s.validate_manifest(svc, crds=crds), "spec.serveConfigV2", "not valid YAML")


def test_core_kinds_are_checked_strictly(rendered):
    policy = copy.deepcopy(rendered["base/networkpolicy.yaml"][0])
    policy["spec"]["podSelektor"] = {}
    _one(k8s.validate_manifest(policy), "spec", "podSelektor")


def test_missing_crd_file_gives_a_clear_error(tmp_path, rendered):
    with pytest.raises(k8s.ManifestError, match=r"LLMSERVE_NB_CRDS.*kubectl get crd rayservices\.ray\.io"):
        k8s.validate_manifest(_gpu_service(rendered), crds=tmp_path)


# ---- CLI -----------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    k8s.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_fails_with_a_diff_on_drift(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert _cli(["render-k8s", "--out", str(out)]) == 0
    assert _cli(["render-k8s", "--out", str(out), "--check"]) == 0
    path = out / "base" / "rayservice-gpu.yaml"
    path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    capsys.readouterr()
    assert _cli(["render-k8s", "--out", str(out), "--check"]) == 1
    diff = capsys.readouterr().out
    assert "-          max_batch_size: 9" in diff and "+          max_batch_size: 8" in diff


def test_cli_validate_reports_errors_and_exit_code(tmp_path, crds, capsys, rendered):
    bad = _gpu_service(rendered)
    bad["spec"]["bogus"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert _cli(["validate-k8s", str(path), "--crds", str(crds)]) == 1
    assert "spec: unknown field(s) 'bogus'" in capsys.readouterr().out
