"""The rendered k8s/ tree: valid against the KubeRay, Gateway API and Prometheus Operator CRDs and the
Kubernetes schemas, committed == rendered, serveConfigV2 == backends.serve_config(AppConfig), no Secret with a
literal value, Ray token auth everywhere, and the CPU and rollout overlays' patches produce the intended
RayServices.

The overlay checks apply the JSON6902 patches in this file, so they test the patches themselves, not just the
files' structure; tests/test_k8s_kustomize.py builds the same with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from llmserve_nb import k8s
from llmserve_nb.backends import get_backend, serve_config
from llmserve_nb.backends.vllm import render as vllm_app

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"


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
        "Namespace",
        "ServiceAccount",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "Deployment",
        "Kustomization",
        "Component",
        "ConfigMap",
        "PodMonitor",
        "PrometheusRule",
        "Gateway",
        "HTTPRoute",
    } <= kinds
    errors = {
        f"{rel}:{d['kind']}/{d['metadata'].get('name') if 'metadata' in d else ''}": k8s.validate_manifest(d, crds=crds)
        for rel, d in objs
    }
    assert {k: v for k, v in errors.items() if v} == {}


def test_committed_tree_equals_fresh_render():
    problems = k8s.check_manifests(K8S)
    assert not problems, "k8s/ drifted; run `llmserve-nb k8s render`:\n" + "".join(problems)


def test_committed_tree_validates_including_kustomize_references(crds):
    assert k8s.validate_files([K8S], crds=crds) == []


def test_serve_config_v2_is_the_yaml_of_the_serve_config(rendered):
    for rel, name, prof in [
        ("base/rayservice-gpu.yaml", "llm", "gpu"),
        ("extras/fractional-gpu/rayservices.yaml", "llm-half", "gpu-half"),
        ("extras/fractional-gpu/rayservices.yaml", "llm-quarter", "gpu-quarter"),
    ]:
        svc = next(d for d in rendered[rel] if d["metadata"]["name"] == name and d["kind"] == "RayService")
        text = svc["spec"]["serveConfigV2"]
        assert text == yaml.safe_dump(serve_config(k8s.profile(prof)), sort_keys=False)
        assert yaml.safe_load(text) == serve_config(k8s.profile(prof))
    committed = yaml.safe_load((K8S / "base" / "rayservice-gpu.yaml").read_text())
    assert yaml.safe_load(committed["spec"]["serveConfigV2"]) == serve_config(k8s.profile("gpu"))


def test_vllm_rayservice_serves_the_vllm_profile_through_ray_serve_llm(crds, rendered):
    svc, _pdb = rendered["extras/vllm-gpu/rayservice.yaml"]
    assert svc["metadata"]["name"] == "llm-vllm"
    assert svc["spec"]["serveConfigV2"] == yaml.safe_dump(serve_config(k8s.profile("vllm-gpu")), sort_keys=False)
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    [llm_config] = app["args"]["llm_configs"]
    assert llm_config["accelerator_config"] == {"kind": "gpu"}
    assert llm_config["placement_group_config"]["bundle_per_worker"]["GPU"] == 1
    assert k8s.validate_manifest(svc, crds=crds) == []


def test_the_vllm_rayservice_turns_on_rays_high_throughput_serving_and_the_transformers_one_does_not(rendered):
    """Ray's KubeRay guide for high-throughput Serve: HAProxy ingress and throughput-optimized mode, read by
    every Ray process at start, so they go in each container's environment (measured on CPU:
    benchmarks/serve_llm_settings.py). Only the vLLM app, where they were measured, gets them."""
    def env(svc, group):
        cluster = svc["spec"]["rayClusterConfig"]
        spec = cluster["headGroupSpec"] if group == "head" else cluster["workerGroupSpecs"][0]
        return {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}

    want = get_backend("vllm").cluster_env(k8s.profile("vllm-gpu"))
    assert want == vllm_app.HIGH_THROUGHPUT_ENV
    assert want == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert get_backend("transformers").cluster_env(k8s.profile("gpu")) == {}
    vllm, _pdb = rendered["extras/vllm-gpu/rayservice.yaml"]
    for group in ("head", "worker"):
        assert {k: env(vllm, group).get(k) for k in want} == want
        assert not set(want) & set(env(_gpu_service(rendered), group))


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
    svc = next(d for d in rendered["extras/fractional-gpu/rayservices.yaml"] if d["metadata"]["name"] == name)
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    dep = app["deployments"][0]
    assert dep["ray_actor_options"]["num_gpus"] == gpus
    assert dep["user_config"]["max_batch_size"] == batch
    assert (dep["user_config"]["batch_wait_timeout_s"] > 0) is dynamic
    # A fixed count is rendered as autoscaling pinned to it (switching to autoscaling stays in place).
    assert dep["autoscaling_config"] == {"min_replicas": replicas, "max_replicas": replicas, "initial_replicas": replicas}
    assert gpus * replicas == 1.0  # the replicas exactly fill the one GPU a worker pod requests
    worker = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_raycluster_has_in_tree_autoscaling_and_gpu_group(rendered):
    rc = rendered["extras/notebook/raycluster.yaml"][0]["spec"]
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


def _committed_docs():
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def test_no_committed_manifest_holds_a_secret_value():
    # An `apply -k` must never deploy a key that is public because it sits in the repository.
    for path, doc in _committed_docs():
        if isinstance(doc, dict) and doc.get("kind") == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret with literal data"
        if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
            for gen in doc.get("secretGenerator", []):
                assert not gen.get("literals"), f"{path}: secretGenerator with literals"
    assert not (K8S / "base" / "api-key-secret.yaml").exists()


def test_api_key_secret_comes_from_a_git_ignored_env_file(rendered):
    kz = rendered["base/kustomization.yaml"][0]
    [gen] = kz["secretGenerator"]
    assert gen["name"] == "llmserve-api-key" and gen["envs"] == ["api-key.env"]
    assert kz["namespace"] == "llmserve" and "namespace" not in gen  # the kustomization's namespace, not its own
    # kustomize cannot rewrite a hashed name inside KubeRay's pod templates, so the name must stay fixed.
    assert gen["options"]["disableNameSuffixHash"] is True
    assert "api-key.env" in (K8S / "base" / ".gitignore").read_text().splitlines()
    example = (K8S / "base" / "api-key.env.example").read_text()
    assert "openssl rand" in example
    # The template defines no key: every non-comment line is blank, so copying it deploys nothing usable.
    assert all(not line.strip() or line.startswith("#") for line in example.splitlines())


def test_missing_env_file_without_template_is_reported(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        yaml.safe_dump({"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                        "secretGenerator": [{"name": "s", "envs": ["key.env"]}]})
    )
    [error] = k8s.validate_files([base])
    assert "'key.env' is missing" in error and "key.env.example" in error and ".gitignore" in error
    (base / "key.env.example").write_text("# how to create key.env\n")
    (base / ".gitignore").write_text("key.env\n")
    assert k8s.validate_files([base]) == []


def test_readme_documents_rotation_and_the_ray_token_secret():
    readme = (K8S / "README.md").read_text()
    assert "api-key.env" in readme and "Rotating the API key" in readme
    assert "`auth_token`" in readme and "auth_token_secret_name" in readme


def test_pods_get_the_api_key_under_the_name_the_replicas_read(rendered):
    """Both backends' replicas (server.app, server.vllm_ingress) and the manifests take the name from config."""
    from llmserve_nb.config import API_KEY_ENV

    assert k8s.API_KEY_ENV == API_KEY_ENV == "LLMSERVE_NB_API_KEY"
    head = rendered["base/rayservice-gpu.yaml"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    env = head["template"]["spec"]["containers"][0]["env"]
    assert {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "llmserve-api-key", "key": "api-key"}}} in env


def test_hpa_is_opt_in_and_uses_metrics_ray_exports(rendered):
    import ray

    base = rendered["base/kustomization.yaml"][0]["resources"]
    assert not any("hpa" in r for r in base)
    query = rendered["components/hpa/prometheus-adapter-values.yaml"][0]["rules"]["external"][0]["metricsQuery"]
    ray_src = "".join(p.read_text() for p in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"))
    for metric in ("serve_deployment_queued_queries", "serve_num_ongoing_requests_at_replicas"):
        assert f"ray_{metric}" in query and f'"{metric}"' in ray_src
    hpa = rendered["components/hpa/hpa.yaml"][0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == rendered["components/hpa/ray-gpu-workers.yaml"][0]["metadata"]["name"]
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
    patched = _overlay_service("overlays/cpu")
    assert patched == k8s.cpu_rayservice()
    assert k8s.validate_manifest(patched, crds=crds) == []
    serve = yaml.safe_load(patched["spec"]["serveConfigV2"])
    assert serve == serve_config(k8s.profile("cpu"))
    assert serve["applications"][0]["args"].get("engine", {}).get("model_source", "smollm2") == "smollm2"
    assert "num_gpus" not in serve["applications"][0]["deployments"][0]["ray_actor_options"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(patched) and "tolerations" not in yaml.safe_dump(patched)


def _overlay_service(overlay: str) -> dict:
    """The RayService an overlay produces: its base's RayService with the JSON6902 patches of the overlay and of
    the Components it includes applied."""
    folder = K8S / overlay
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    base_dir = folder / next(r for r in kz["resources"] if (folder / r / "kustomization.yaml").is_file())
    base_files = yaml.safe_load((base_dir / "kustomization.yaml").read_text())["resources"]
    patches = [(folder, p) for p in kz.get("patches", [])]
    for ref in kz.get("components", []):
        component = yaml.safe_load((folder / ref / "kustomization.yaml").read_text())
        assert component["kind"] == "Component"
        patches += [(folder / ref, p) for p in component.get("patches", [])]
    [(where, patch)] = [(w, p) for w, p in patches if p["target"]["kind"] == "RayService"]
    target = patch["target"]
    [service] = [
        d
        for f in base_files
        for d in yaml.safe_load_all((base_dir / f).read_text())
        if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
    ]
    return _json6902(service, yaml.safe_load((where / patch["path"]).read_text()))


def test_rollout_overlay_makes_the_gpu_rayservice_upgrade_incrementally(crds):
    patched = _overlay_service("overlays/rollout")
    assert patched == k8s.rollout_rayservice()
    assert k8s.validate_manifest(patched, crds=crds) == []
    strategy = patched["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    opts = strategy["clusterUpgradeOptions"]
    assert set(opts) == {"gatewayClassName", "maxSurgePercent", "stepSizePercent", "intervalSeconds"}
    assert 0 < opts["stepSizePercent"] <= opts["maxSurgePercent"] <= 100 and opts["intervalSeconds"] > 0
    assert patched["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert yaml.safe_load(patched["spec"]["serveConfigV2"]) == serve_config(k8s.profile("gpu"))
    assert "num_gpus" in yaml.safe_dump(yaml.safe_load(patched["spec"]["serveConfigV2"]))


def test_rollout_split_routes_to_both_versions_and_leaves_kuberays_names_alone(rendered):
    kz = rendered["components/rollout/kustomization.yaml"][0]
    objs = {d["kind"]: d for rel in kz["resources"] for d in rendered[f"components/rollout/{rel}"]}
    gateway, route, v2 = objs["Gateway"], objs["HTTPRoute"], objs["RayService"]
    # KubeRay owns <name>-gateway and <name>-httproute during incremental upgrades; ours must not collide.
    assert gateway["metadata"]["name"] != "llm-gateway" and route["metadata"]["name"] != "llm-httproute"
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": "http"}]
    assert gateway["spec"]["gatewayClassName"] == k8s.rollout_rayservice()["spec"]["upgradeStrategy"][
        "clusterUpgradeOptions"]["gatewayClassName"]
    v2_svc = f"{v2['metadata']['name']}-serve-svc"
    by_path = {r["matches"][0]["path"]["value"]: r for r in route["spec"]["rules"]}
    assert [b["name"] for b in by_path["/v2"]["backendRefs"]] == [v2_svc]
    assert by_path["/v2"]["filters"][0]["urlRewrite"]["path"]["replacePrefixMatch"] == "/"
    weights = {b["name"]: b["weight"] for b in by_path["/"]["backendRefs"]}
    assert weights == {"llm-serve-svc": 90, v2_svc: 10}
    assert all(b["port"] == 8000 for r in route["spec"]["rules"] for b in r["backendRefs"])
    assert yaml.safe_load(v2["spec"]["serveConfigV2"])["applications"][0]["name"] == "llm-v2"
    assert v2["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "0.2.0-gpu")


def test_incremental_upgrade_rules_of_kuberay_are_enforced(crds):
    svc = k8s.rollout_rayservice()
    svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = False
    _one(k8s.validate_manifest(svc, crds=crds), "enableInTreeAutoscaling")
    svc = k8s.rollout_rayservice()
    svc["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["stepSizePercent"] = 80
    _one(k8s.validate_manifest(svc, crds=crds), "stepSizePercent", "maxSurgePercent")
    svc = k8s.rollout_rayservice()
    del svc["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"]
    _one(k8s.validate_manifest(svc, crds=crds), "clusterUpgradeOptions", "'gatewayClassName'")  # CRD: required
    with pytest.raises(ValueError, match="step_size_percent"):
        k8s.RolloutSpec(step_size_percent=60, max_surge_percent=50)


def test_new_kinds_are_checked_against_their_crds(rendered):
    route = copy.deepcopy(rendered["components/rollout/httproute-split.yaml"][0])
    route["spec"]["rules"][1]["backendRefs"][0]["wieght"] = 1
    _one(k8s.validate_manifest(route), "spec.rules[1].backendRefs[0]", "'wieght'")
    gateway = copy.deepcopy(rendered["components/rollout/gateway.yaml"][0])
    del gateway["spec"]["gatewayClassName"]
    _one(k8s.validate_manifest(gateway), "'gatewayClassName'")
    monitor = copy.deepcopy(rendered["components/observability/podmonitors.yaml"][0])
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8080
    _one(k8s.validate_manifest(monitor), "podMetricsEndpoints[0].port")
    rule = copy.deepcopy(rendered["components/observability/prometheusrule.yaml"][0])
    rule["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    _one(k8s.validate_manifest(rule), "spec.groups[0].rules[0]", "'fro'")


# ---- Ray token auth ------------------------------------------------------------------------------
def _ray_cluster_specs(rendered):
    for rel, d in _objects(rendered):
        if d["kind"] == "RayCluster":
            yield rel, d["metadata"]["name"], d["spec"]
        elif d["kind"] == "RayService":
            yield rel, d["metadata"]["name"], d["spec"]["rayClusterConfig"]


def test_every_ray_cluster_requires_the_ray_token(rendered):
    specs = list(_ray_cluster_specs(rendered))
    assert len(specs) >= 5
    for rel, name, spec in specs:
        assert spec["authOptions"] == {"mode": "token"}, f"{rel}:{name}"
    assert k8s.cpu_rayservice()["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_token_auth_needs_a_recent_ray(crds, rendered):
    svc = _gpu_service(rendered)
    svc["spec"]["rayClusterConfig"]["rayVersion"] = "2.50.0"
    _one(k8s.validate_manifest(svc, crds=crds), "rayVersion", "2.52.0")


def test_hpa_workers_join_with_the_token_kuberay_generated(rendered):
    env = rendered["components/hpa/ray-gpu-workers.yaml"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
    token = {"secretKeyRef": {"name": "llm-notebook", "key": "auth_token"}}
    assert {"name": "RAY_AUTH_TOKEN", "valueFrom": token} in env


@pytest.mark.parametrize(
    "cluster, secret",
    [
        ("llm-notebook", "llm-notebook"),
        ("llm-x7k2q", "llm-x7k2q"),  # a RayService's generated cluster name
        ("a" * 10 + "b" * 50, "b" * 50),  # CheckName keeps the last 50 characters
        ("9lives", "rlives"),  # ... and replaces a leading digit
        ("x" * 11 + "-" + "y" * 49, "r" + "y" * 49),  # ... or a leading punctuation mark left by the cut
    ],
)
def test_auth_token_secret_name_follows_kuberays_check_name(cluster, secret):
    assert k8s.auth_token_secret_name(cluster) == (secret, "auth_token")


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


def test_missing_crd_gives_a_clear_error(tmp_path, rendered, monkeypatch):
    with pytest.raises(k8s.ManifestError, match=r"rayservices\.ray\.io.*not found in .*kubectl get crd rayservices"):
        k8s.validate_manifest(_gpu_service(rendered), crds=tmp_path)
    with pytest.raises(k8s.ManifestError, match="CRD folder.* not found"):
        k8s.validate_manifest(_gpu_service(rendered), crds=tmp_path / "absent")
    # No default folder: nothing named and no $LLMSERVE_NB_CRDS says what to pass.
    monkeypatch.delenv(k8s.CRD_ENV, raising=False)
    with pytest.raises(k8s.ManifestError, match="no CRD source: pass --crds DIR .* or --from-cluster"):
        k8s.validate_manifest(_gpu_service(rendered))
