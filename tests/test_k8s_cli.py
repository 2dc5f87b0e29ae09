"""`llmserve-nb k8s render|check|validate`: exit codes (0 ok, 1 failure, 2 usage), the drift check, an overlay
rendered from a user's AppConfig file that validates and builds with kustomize, validation against CRDs read from
a cluster's API (a local stand-in for apiextensions.k8s.io/v1) or a folder, and no ray/torch on the render path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from llmserve_nb import k8s
from llmserve_nb.backends import serve_config
from llmserve_nb.config import AppConfig

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmserve-nb")
    k8s.add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(["k8s", *argv])
    return args.func(args)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        _cli(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def app_yaml(tmp_path) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump({"name": "chat", "batching": {"max_batch_size": 4},
                                    "deployment": {"num_replicas": 1, "num_cpus": 2}}))
    return path


@pytest.fixture
def overlay(tmp_path, app_yaml, capsys) -> Path:
    out = tmp_path / "my-llm"
    assert _cli(["render", "--config", str(app_yaml), "--model", MODEL, "--image", "reg.example.com/llm:1",
                 "--namespace", "team-a", "--name", "my-llm", "--out", str(out)]) == 0
    assert f"validate it: llmserve-nb k8s validate {out}" in capsys.readouterr().err
    return out


def test_check_fails_with_a_diff_on_drift(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert _cli(["render", "--out", str(out)]) == 0
    assert _cli(["check", "--out", str(out)]) == 0
    path = out / "base" / "rayservice-gpu.yaml"
    path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    capsys.readouterr()
    assert _cli(["check", "--out", str(out)]) == 1
    diff = capsys.readouterr().out
    assert "-          max_batch_size: 9" in diff and "+          max_batch_size: 8" in diff


def test_validate_reports_errors_and_exit_codes(tmp_path, crds, capsys):
    bad = k8s.render_manifests()["base/rayservice-gpu.yaml"][0]
    bad["spec"]["bogus"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    args = [a for d in crds for a in ("--crds", str(d))]
    assert _cli(["validate", str(path), *args]) == 1
    assert "spec: unknown field(s) 'bogus'" in capsys.readouterr().out
    assert _cli(["validate", "k8s", *args]) == 0
    # A folder without the CRD: a failure that names the CRD and how to get it.
    assert _cli(["validate", str(path), "--crds", str(tmp_path)]) == 1
    assert "kubectl get crd rayservices.ray.io" in capsys.readouterr().err


def test_no_crd_source_is_a_usage_error_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(k8s.CRD_ENV, raising=False)
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(k8s.cpu_rayservice()))
    assert _cli(["validate", str(path)]) == 2
    assert "no CRD source: pass --crds DIR" in capsys.readouterr().err
    assert "no such file" in _usage_error(["validate", str(tmp_path / "absent.yaml")], capsys)
    assert "not allowed with" in _usage_error(["validate", str(path), "--crds", "x", "--from-cluster"], capsys)


def test_usage_errors_and_help_with_examples(app_yaml, capsys):
    assert "need --config" in _usage_error(["render", "--model", MODEL], capsys)
    assert "--config needs --out" in _usage_error(["render", "--config", str(app_yaml)], capsys)
    assert "required" in _usage_error([], capsys)
    for command in ("render", "validate"):
        with pytest.raises(SystemExit) as exit_:
            _cli([command, "--help"])
        assert exit_.value.code == 0
        assert "examples:\n  " in capsys.readouterr().out


def test_a_bad_config_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump({"batching": {"max_batch_size": "many"}}))
    assert "batching.max_batch_size" in _usage_error(["render", "--config", str(path), "--out", str(tmp_path)], capsys)


def test_render_config_writes_an_overlay_for_the_users_model(overlay):
    kz = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kz["namespace"] == "team-a"
    [svc] = yaml.safe_load_all((overlay / "rayservice.yaml").read_text())
    assert svc["metadata"]["name"] == "my-llm"
    app = AppConfig.from_file(overlay.parent / "app.yaml").with_overrides(**{"engine.model_source": MODEL})
    assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == serve_config(app)
    images = {c["image"] for g in [svc["spec"]["rayClusterConfig"]["headGroupSpec"],
                                   *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert images == {"reg.example.com/llm:1"}
    # A CPU app gets CPU pods; the api key and HF token come from files that are never committed.
    assert "nvidia.com/gpu" not in yaml.safe_dump(svc)
    assert {"api-key.env"} <= set((overlay / ".gitignore").read_text().splitlines())
    assert (overlay / "components" / "hf-token" / "hf-token.env.example").is_file()


def test_the_rendered_overlay_validates(overlay, crds):
    assert k8s.validate_files([overlay], crds=crds) == []


@pytest.mark.usefixtures("kubectl")
def test_the_rendered_overlay_builds_with_its_components_in_its_namespace(overlay, crds, tmp_path):
    (overlay / "api-key.env").write_text("api-key=test-only\n")
    user = tmp_path / "mine"
    user.mkdir()
    # What a user does: an overlay of their own that opts into the Components (with its own namespace line: the
    # rendered kustomization's does not reach what the Components add).
    (user / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../my-llm"],
        "namespace": "team-a",
        "components": ["../my-llm/components/model-cache-pvc", "../my-llm/components/observability"],
    }))
    for folder in (overlay, user):
        r = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"team-a"}
        errors = {f"{d['kind']}/{d['metadata']['name']}": k8s.validate_manifest(d, crds=crds) for d in docs}
        assert {k: v for k, v in errors.items() if v} == {}
    assert {"PersistentVolumeClaim", "PodMonitor", "PrometheusRule"} <= {d["kind"] for d in docs}


def test_render_and_check_never_import_ray_or_torch(tmp_path, app_yaml):
    """A core install (no [serve]) renders: neither the k8s modules nor the renderer pull in ray or torch."""
    code = (
        "import sys, argparse\n"
        "from llmserve_nb import k8s\n"
        "p = argparse.ArgumentParser(); k8s.add_cli(p.add_subparsers(required=True))\n"
        "for argv in sys.argv[1:]:\n"
        "    a = p.parse_args(argv.split('|')); assert a.func(a) == 0, argv\n"
        "bad = sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", code, f"k8s|render|--config|{app_yaml}|--model|{MODEL}|--out|{out}",
         f"k8s|render|--out|{tmp_path / 'tree'}", f"k8s|check|--out|{tmp_path / 'tree'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr


# ---- CRDs read from a cluster's API ----------------------------------------------------------------------
class _FakeApiServer(BaseHTTPRequestHandler):
    """GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/<name>, answered from CRD files."""

    crds: dict[str, dict] = {}
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        prefix = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
        self.seen.append(self.path)
        crd = self.crds.get(self.path.removeprefix(prefix)) if self.path.startswith(prefix) else None
        body = json.dumps(crd or {"kind": "Status", "code": 404, "reason": "NotFound"}).encode()
        self.send_response(200 if crd else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_cluster(tmp_path, crds, monkeypatch):
    """An API server holding only the KubeRay CRDs, and a kubeconfig whose context `fake` points at it."""
    source = k8s.crd_source(crds)
    handler = type("Handler", (_FakeApiServer,), {"seen": [], "crds": {
        f"{plural}.ray.io": source.crd("ray.io", kind) for kind, plural in
        (("RayService", "rayservices"), ("RayCluster", "rayclusters"))}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "other",
              "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
              "users": [{"name": "me", "user": {"token": "t"}}],
              "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}},
                           {"name": "other", "context": {"cluster": "nowhere", "user": "me"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield handler
    server.shutdown()
    thread.join(timeout=10)


def test_validate_from_cluster_reads_the_crds_through_the_api(fake_cluster, tmp_path, capsys):
    svc = k8s.cpu_rayservice()
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(svc))
    assert _cli(["validate", str(path), "--from-cluster", "--context", "fake"]) == 0
    assert fake_cluster.seen == ["/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayservices.ray.io"]
    svc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    path.write_text(yaml.safe_dump(svc))
    assert _cli(["validate", str(path), "--from-cluster", "--context", "fake"]) == 1
    assert "'rayStartParms'" in capsys.readouterr().out


def test_from_cluster_names_a_crd_the_cluster_lacks(fake_cluster, tmp_path, capsys):
    monitor = k8s.render_manifests()["components/observability/podmonitors.yaml"][0]
    path = tmp_path / "pm.yaml"
    path.write_text(yaml.safe_dump(monitor))
    assert _cli(["validate", str(path), "--from-cluster", "--context", "fake"]) == 1
    assert "the cluster has no CRD podmonitors.monitoring.coreos.com" in capsys.readouterr().err


def test_from_cluster_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(k8s.cpu_rayservice()))
    assert _cli(["validate", str(path), "--from-cluster"]) == 1
    assert "no cluster to read CRDs from" in capsys.readouterr().err


def test_a_crd_folder_may_hold_kubectl_output_under_any_name(tmp_path, crds):
    """What `kubectl get crd A B -o yaml > DIR/x.yaml` writes: one List with both CRDs."""
    source = k8s.crd_source(crds)
    items = [source.crd("ray.io", "RayService"), source.crd("ray.io", "RayCluster")]
    (tmp_path / "from-my-cluster.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                                   "items": items}))
    assert k8s.validate_manifest(k8s.cpu_rayservice(), crds=tmp_path) == []
