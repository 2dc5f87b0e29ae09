"""k8s/components/observability/ and k8s/grafana/: PodMonitors on Ray's metrics port, PrometheusRule alerts
that promtool accepts and that follow the backend each app selects, the Grafana dashboard (JSON == ConfigMap), and `all_promql_expressions()`
naming only metrics the app (llmserve_nb.observability.promql), vLLM or Ray 2.60's Serve export.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from llmserve_nb import k8s
from llmserve_nb.backends import all_backends, get_backend
from llmserve_nb.config import EngineConfig
from llmserve_nb.observability.promql import METRIC_NAMES

K8S = Path(__file__).resolve().parents[1] / "k8s"
_needs_promtool = pytest.mark.usefixtures("promtool")  # conftest: skip, or fail in CI


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return k8s.render_manifests()


def _ray_serve_metric_names() -> set[str]:
    """Every Serve metric Ray 2.60 defines, as exported (`ray_` prefix, `_total` on counters)."""
    import ray

    root = Path(ray.__file__).parent / "serve" / "_private"
    names = set()
    for path in root.glob("*.py"):
        text = path.read_text()
        for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*(?:name=)?f?\"(serve_[a-z_{}]+)\"", text):
            for protocol in ("http", "grpc"):
                name_p = name.replace("{protocol_name}", protocol)
                names.add(f"ray_{name_p}" + ("_total" if kind == "Counter" else ""))
    return names


def _ray_vllm_metric_names() -> set[str]:
    """The vLLM metric names Ray 2.60's own Serve LLM Grafana dashboard queries: an independent list."""
    import ray

    panels = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    text = (panels / "serve_llm_dashboard_panels.py").read_text()
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"ray_vllm_[a-z0-9_]+", text)}


def test_pod_monitors_scrape_the_metrics_port_of_head_and_workers(rendered):
    head, workers = rendered["components/observability/podmonitors.yaml"]
    for monitor in (head, workers):
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert head["spec"]["selector"]["matchExpressions"] == [
        {"key": "ray.io/node-type", "operator": "In", "values": ["head"]}]
    assert workers["spec"]["selector"]["matchExpressions"][0]["operator"] == "NotIn"
    # The port named "metrics" is 8080 on every Ray pod the monitors select.
    ray_service = rendered["base/rayservice-gpu.yaml"][0]["spec"]["rayClusterConfig"]
    pods = [ray_service["headGroupSpec"]["template"]] + [g["template"] for g in ray_service["workerGroupSpecs"]]
    pods.append(rendered["components/hpa/ray-gpu-workers.yaml"][0]["spec"]["template"])
    for pod in pods:
        assert {"name": "metrics", "containerPort": 8080} in pod["spec"]["containers"][0]["ports"]


def _groups(rendered) -> list[dict]:
    return rendered["components/observability/prometheusrule.yaml"][0]["spec"]["groups"]


def test_alerts_cover_latency_errors_scaling_and_queue(rendered):
    groups = {g["name"]: {r["alert"]: r for r in g["rules"]} for g in _groups(rendered)}
    assert set(groups) == {f"llmserve-nb.{n}" for n in ("llm", "llm-half", "llm-quarter", "llm-vllm", "llm-v2")}
    llm = groups["llmserve-nb.llm"]
    assert set(llm) == {"LLMServeTTFTHigh", "LLMServeErrorRatioHigh", "LLMServeReplicasAtMax", "LLMServeQueueGrowing"}
    assert "histogram_quantile(0.99" in llm["LLMServeTTFTHigh"]["expr"] and "> 2.0" in llm["LLMServeTTFTHigh"]["expr"]
    top = k8s.profile("gpu").deployment.autoscaling.max_replicas
    assert llm["LLMServeReplicasAtMax"]["expr"].endswith(f">= {top}") and llm["LLMServeReplicasAtMax"]["for"] == "15m"
    assert "deriv(ray_llmserve_num_requests_waiting" in llm["LLMServeQueueGrowing"]["expr"]
    # Fixed replica counts cannot be "at max" in the autoscaling sense.
    assert "LLMServeReplicasAtMax" not in groups["llmserve-nb.llm-half"]
    # The vLLM RayService's group watches vLLM's metrics.
    vllm = groups["llmserve-nb.llm-vllm"]
    assert "ray_vllm_time_to_first_token_seconds_bucket" in vllm["LLMServeTTFTHigh"]["expr"]
    # Each group watches its own model deployment's target.
    assert 'deployment="LLMServer:SmolLM2-135M-Instruct"' in vllm["LLMServeReplicasAtMax"]["expr"]
    assert 'deployment="LLMServer"' in llm["LLMServeReplicasAtMax"]["expr"]


def test_alerts_follow_the_backend_the_config_selects():
    app = k8s.profile("gpu")
    vllm = app.model_copy(update={"engine": EngineConfig(backend="vllm", model_source="Qwen/Qwen2.5-1.5B-Instruct")})
    exprs = {a.name: a.expr for a in k8s.alerts(vllm)}
    ttft = 'ray_vllm_time_to_first_token_seconds_bucket{model_name="Qwen2.5-1.5B-Instruct"}'
    assert ttft in exprs["LLMServeTTFTHigh"]
    assert "ray_vllm_num_requests_waiting" in exprs["LLMServeQueueGrowing"]
    assert "ray_serve_num_http_requests_total" in exprs["LLMServeErrorRatioHigh"]
    assert "ray_llmserve" not in " ".join(exprs.values())
    assert "ray_vllm" not in " ".join(a.expr for a in k8s.alerts(app))


@_needs_promtool
def test_promtool_accepts_the_rule_groups(rendered, tmp_path):
    committed = yaml.safe_load((K8S / "components" / "observability" / "prometheusrule.yaml").read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": committed["spec"]["groups"]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "FAILED" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_dashboard_json_and_configmap_are_the_same_dashboard(rendered):
    text = (K8S / "grafana" / "grafana-dashboard.json").read_text()
    cm = rendered["grafana/grafana-dashboard-configmap.yaml"][0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert rendered["grafana/kustomization.yaml"][0]["namespace"] == "monitoring" and "namespace" not in cm["metadata"]
    assert cm["data"] == {"llmserve-nb.json": text}
    dash = json.loads(text)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {o["value"] for o in variables["prefix"]["options"]} == {"ray_llmserve", "ray_vllm"}
    assert variables["prefix"]["current"]["value"] == "ray_llmserve"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert sum("${prefix}_" in e for e in exprs) >= 10
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@_needs_promtool
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_every_expression_parses(backend, tmp_path):
    # promtool parses each expression as a recording rule: a syntax check without a server.
    exprs = k8s.all_promql_expressions(backend, with_thresholds=True)
    rules = [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_every_expression_names_only_exported_metrics(backend):
    exprs = k8s.all_promql_expressions(backend)
    assert {k.split("/")[0] for k in exprs} == {"dashboard", "alert", "hpa"}
    assert not [e for e in exprs.values() if "$" in e or "<<" in e], "unsubstituted template variables"
    # Independent lists of what each engine exports: the app's own names, and Ray's Serve LLM dashboard.
    exported = {"transformers": set(METRIC_NAMES), "vllm": _ray_vllm_metric_names()}
    assert get_backend("transformers").engine_metrics == exported["transformers"]
    assert get_backend("vllm").engine_metrics <= exported["vllm"]
    engine = exported[backend]
    serve = _ray_serve_metric_names()
    assert "ray_serve_num_http_requests_total" in serve and "ray_serve_deployment_replica_healthy" in serve
    others = [b.metric_prefix for b in all_backends() if b.name != backend]
    assert others and get_backend(backend).metric_prefix not in others
    for key, expr in exprs.items():
        assert not [p for p in others if p in expr], key
        for name in re.findall(r"\bray_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in engine | serve, f"{key}: {name} is exported by neither the engine nor Ray Serve 2.60"


def test_all_promql_expressions_targets_the_given_app():
    app = k8s.profile("gpu-half")
    exprs = k8s.all_promql_expressions(app=app, rate_window="30s")
    assert 'application="llm-half"' in exprs["alert/LLMServeTTFTHigh"]
    assert "[30s]" in exprs["dashboard/Time to first token/p99"]
    assert "alert/LLMServeReplicasAtMax" not in exprs  # fixed replicas
    assert exprs["alert/LLMServeTTFTHigh"] == next(a.signal for a in k8s.alerts(app) if a.name == "LLMServeTTFTHigh")
    with pytest.raises(ValueError, match="unknown backend 'sglang'"):
        k8s.all_promql_expressions("sglang")


def test_dashboard_panels_follow_the_metrics_each_backend_exports():
    """A panel is shipped for a backend when that backend exports its engine metrics: the admission batch
    histogram is the transformers engine's only."""
    panels = {b.name: {k for k in k8s.all_promql_expressions(b.name) if k.startswith("dashboard/")}
              for b in all_backends()}
    admission = {"dashboard/Admission batch size/p50", "dashboard/Admission batch size/p99"}
    assert admission <= panels["transformers"]
    assert panels["vllm"] == panels["transformers"] - admission
