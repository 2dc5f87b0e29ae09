"""`kubectl kustomize` (client only) builds every kustomization of k8s/, and an overlay with every Component,
into objects that validate; and what a platform team looks for is in the built output: the namespace set by
kustomize (one line moves everything), a dedicated ServiceAccount without token automount, the workers'
PodDisruptionBudget, /dev/shm with a sizeLimit, egress NetworkPolicies, the optional HF token, the model cache,
probes where KubeRay does not inject them, and an image pinned by digest through `images:`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmserve_nb import k8s
from llmserve_nb.backends import serve_config

K8S = Path(__file__).resolve().parents[1] / "k8s"
pytestmark = pytest.mark.usefixtures("kubectl")  # its built-in kustomize (conftest: skip, or fail in CI)

FOLDERS = ["base", "overlays/cpu", "overlays/rollout", "overlays/notebook-hpa", "extras/fractional-gpu",
           "extras/vllm-gpu", "extras/notebook", "grafana"]
COMPONENTS = ["observability", "rollout", "hf-token", "model-cache-pvc"]
DIGEST = "sha256:" + "0123456789abcdef" * 4
# Namespaced kinds that may stay out of the kustomization's namespace, and why: none. The Namespace object is
# cluster-scoped and kustomize renames it; grafana/ sets Grafana's namespace in its own kustomization.
CLUSTER_SCOPED = {"Namespace"}


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)


def _overlay(tree: Path, name: str, **fields) -> Path:
    folder = tree / "overlays" / name
    folder.mkdir(parents=True)
    kz = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kz))
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of k8s/ with the git-ignored env files created the way their templates say, plus test overlays:
    every Component in another namespace, and the documented digest pin."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    (tree / "base" / "api-key.env").write_text("api-key=0123456789abcdef-test-only\n")
    (tree / "components" / "hf-token" / "hf-token.env").write_text("token=hf_test_only\n")
    _overlay(tree, "every-component", namespace="team-a", resources=["../../base"],
             components=[f"../../components/{c}" for c in COMPONENTS])
    _overlay(tree, "pinned", resources=["../cpu"],
             images=[{"name": "llmserve-nb", "newName": "registry.example.com/llmserve-nb", "digest": DIGEST}])
    return tree


@pytest.fixture(scope="module")
def build(tree):
    @functools.lru_cache(maxsize=None)
    def built(folder: str) -> tuple[dict, ...]:
        r = kustomize(tree / folder)
        assert r.returncode == 0, r.stderr
        return tuple(d for d in yaml.safe_load_all(r.stdout) if d)

    return built


def _one(docs, kind: str, name: str | None = None) -> dict:
    [found] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def _pods(svc: dict) -> dict[str, dict]:
    cluster = svc["spec"]["rayClusterConfig"] if svc["kind"] == "RayService" else svc["spec"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": cluster["workerGroupSpecs"][0]["template"]}


def test_kubectl_kustomize_refuses_the_base_until_the_key_file_exists(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    r = kustomize(tree / "base")
    assert r.returncode != 0 and "api-key.env" in r.stderr


@pytest.mark.parametrize("folder", FOLDERS + ["overlays/every-component"])
def test_every_kustomization_builds_objects_that_validate(build, crds, folder):
    docs = build(folder)
    errors = {f"{d['kind']}/{d['metadata']['name']}": k8s.validate_manifest(d, crds=crds) for d in docs}
    assert {k: v for k, v in errors.items() if v} == {}
    if folder == "base":
        secret = _one(docs, "Secret")
        assert secret["metadata"]["name"] == "llmserve-api-key" and set(secret["data"]) == {"api-key"}


def test_every_kustomization_of_the_tree_is_tested():
    folders = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    components = {f for f in folders if yaml.safe_load((K8S / f / "kustomization.yaml").read_text())["kind"]
                  == "Component"}
    assert folders - components == set(FOLDERS)
    assert components == {f"components/{c}" for c in COMPONENTS + ["hpa"]}  # hpa: overlays/notebook-hpa


@pytest.mark.parametrize(
    "folder, expected", [("overlays/cpu", k8s.cpu_rayservice), ("overlays/rollout", k8s.rollout_rayservice)]
)
def test_the_overlays_build_the_rayservice_the_renderer_describes(build, folder, expected):
    svc = dict(_one(build(folder), "RayService", "llm"))
    assert svc["metadata"].pop("namespace") == "llmserve"
    assert svc == expected()


def test_the_cpu_overlay_is_what_the_rehearsal_reads(build):
    """One RayService `llm` serving the CPU profile, with the fields the CI rehearsal starts Ray from."""
    [svc] = [d for d in build("overlays/cpu") if d["kind"] == "RayService"]
    assert svc["metadata"]["name"] == "llm"
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == serve_config(k8s.profile("cpu"))
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0"}
    assert cluster["workerGroupSpecs"][0]["rayStartParams"] == {}
    key = {"secretKeyRef": {"name": "llmserve-api-key", "key": "api-key"}}
    for pod in _pods(svc).values():
        assert {"name": k8s.API_KEY_ENV, "valueFrom": key} in pod["spec"]["containers"][0]["env"]


@pytest.mark.parametrize("folder", ["base", "overlays/cpu", "overlays/rollout", "extras/fractional-gpu",
                                    "extras/vllm-gpu", "extras/notebook"])
def test_ray_pods_use_the_dedicated_service_account_without_a_token(build, folder):
    docs = build(folder)
    sa = _one(build("base"), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for svc in (d for d in docs if d["kind"] in ("RayService", "RayCluster")):
        cluster = svc["spec"]["rayClusterConfig"] if svc["kind"] == "RayService" else svc["spec"]
        for role, pod in _pods(svc).items():
            assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"], (svc["metadata"]["name"], role)
            assert pod["spec"]["automountServiceAccountToken"] is False
        # Only the autoscaler sidecar (KubeRay binds its Role to the head's ServiceAccount) mounts the token.
        [mount] = cluster["autoscalerOptions"]["volumeMounts"]
        assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"]
        head_volumes = {v["name"]: v for v in _pods(svc)["head"]["spec"]["volumes"]}
        sources = head_volumes[mount["name"]]["projected"]["sources"]
        assert {"serviceAccountToken", "configMap", "downwardAPI"} == {k for s in sources for k in s}
        assert not any(m["name"] == mount["name"] for p in _pods(svc).values()
                       for m in p["spec"]["containers"][0]["volumeMounts"])


def test_shm_has_a_size_limit_and_workers_cache_models(build):
    for folder in ("base", "overlays/cpu"):
        svc = _one(build(folder), "RayService", "llm")
        for role, pod in _pods(svc).items():
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"]
            if role == "worker":  # model replicas run on workers only (the head has num-cpus 0)
                cache = volumes[mounts["/home/ray/.cache"]]["emptyDir"]
                assert cache["sizeLimit"] and "medium" not in cache


def test_the_hf_token_is_optional_and_its_secret_comes_only_with_its_component(build):
    for folder in ("base", "overlays/cpu"):
        docs = build(folder)
        assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "llmserve-hf-token"]
        worker = _pods(_one(docs, "RayService", "llm"))["worker"]["spec"]["containers"][0]
        ref = {"name": "llmserve-hf-token", "key": "token", "optional": True}
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}} in worker["env"]
    secret = _one(build("overlays/every-component"), "Secret", "llmserve-hf-token")
    assert set(secret["data"]) == {"token"} and secret["metadata"]["namespace"] == "team-a"
    template = (K8S / "components" / "hf-token" / "hf-token.env.example").read_text()
    assert all(not line.strip() or line.startswith("#") for line in template.splitlines())
    assert "hf-token.env" in (K8S / "components" / "hf-token" / ".gitignore").read_text().splitlines()


def test_the_model_cache_pvc_component_replaces_the_emptydir_of_every_rayservice(build):
    docs = build("overlays/every-component")
    pvc = _one(docs, "PersistentVolumeClaim")
    services = [d for d in docs if d["kind"] == "RayService"]
    assert {s["metadata"]["name"] for s in services} == {"llm", "llm-v2"}
    for svc in services:
        volumes = {v["name"]: v for v in _pods(svc)["worker"]["spec"]["volumes"]}
        assert volumes["model-cache"] == {"name": "model-cache",
                                          "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_one_namespace_line_moves_every_object(build):
    docs = build("overlays/every-component")
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "PodDisruptionBudget", "ServiceAccount", "NetworkPolicy", "Secret", "PodMonitor",
            "PrometheusRule", "Gateway", "HTTPRoute", "PersistentVolumeClaim"} <= kinds
    assert {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs
            if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != "team-a"} == set()
    assert _one(docs, "Namespace")["metadata"]["name"] == "team-a"


def test_no_rendered_object_names_its_namespace():
    for rel, docs in k8s.render_manifests().items():
        for d in docs:
            if isinstance(d, dict) and d.get("kind") not in ("Kustomization", "Component", "Namespace", None):
                assert "namespace" not in d.get("metadata", {}), f"{rel}: {d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("folder, instance", [("base", "llm"), ("extras/vllm-gpu", "llm-vllm"),
                                              ("extras/notebook", "llm-notebook")])
def test_the_pdb_selects_the_workers_and_allows_drains(build, folder, instance):
    docs = build(folder)
    pdb = _one(docs, "PodDisruptionBudget", f"{instance}-workers")["spec"]
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    svc = next(d for d in docs if d["kind"] in ("RayService", "RayCluster") and d["metadata"]["name"] == instance)
    pods = _pods(svc)
    # KubeRay adds ray.io/node-type to the template's labels; the head must not match.
    worker_labels = {**pods["worker"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    head_labels = {**pods["head"]["metadata"]["labels"], "ray.io/node-type": "head"}
    selector = pdb["selector"]["matchLabels"]
    assert selector.items() <= worker_labels.items() and not selector.items() <= head_labels.items()


def test_probes_only_where_kuberay_does_not_inject_them(build):
    # KubeRay v1.7 injects Ray-aware probes (Serve-aware readiness on RayService workers) into containers
    # without probes: ours must leave them empty so the injection happens.
    for svc in (d for f in ("base", "extras/notebook") for d in build(f) if d["kind"] in ("RayService", "RayCluster")):
        for pod in _pods(svc).values():
            c = pod["spec"]["containers"][0]
            assert "livenessProbe" not in c and "readinessProbe" not in c
    workers = _one(build("overlays/notebook-hpa"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        assert workers[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}


def test_egress_is_limited_to_dns_ray_the_model_source_and_the_api_server(build):
    docs = build("base")
    egress = _one(docs, "NetworkPolicy", "llm-ray-egress")["spec"]
    assert egress["policyTypes"] == ["Egress"]
    ports = [sorted((p["protocol"], p["port"]) for p in r.get("ports", [])) for r in egress["egress"]]
    assert [("TCP", 53), ("UDP", 53)] in ports
    [https] = [r for r in egress["egress"] if r.get("ports") == [{"protocol": "TCP", "port": 443}]]
    block = https["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0" and {"10.0.0.0/8", "169.254.0.0/16"} <= set(block["except"])
    head = _one(docs, "NetworkPolicy", "llm-ray-head-egress")["spec"]
    assert head["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    ingress = _one(docs, "NetworkPolicy", "llm-ray")["spec"]
    assert ingress["policyTypes"] == ["Ingress"]


def test_the_image_pins_by_digest_through_kustomize_images(build):
    svc = _one(build("overlays/pinned"), "RayService", "llm")
    for pod in _pods(svc).values():
        assert pod["spec"]["containers"][0]["image"] == f"registry.example.com/llmserve-nb@{DIGEST}"


def test_the_readme_states_each_deviation_and_how_to_pin_the_image():
    readme = (K8S / "README.md").read_text()
    for needle in ("ENABLE_PROBES_INJECTION", "maxUnavailable: 1", "automountServiceAccountToken: false",
                   "autoscalerOptions.volumeMounts", "169.254.0.0/16", "digest: sha256:", "kind: Component",
                   "model_loading_config", "air-gapped", "secretKeyRef.optional: true"):
        assert needle in readme, needle
