"""The whole `k8s/` tree: which file holds what, writing it, and the drift check."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from llmserve_nb.k8s.observability import dashboard_configmap, dashboard_json, pod_monitors, prometheus_rule
from llmserve_nb.k8s.options import HEADER, ClusterSpec
from llmserve_nb.k8s.profiles import profile
from llmserve_nb.k8s.render import (
    cpu_patch,
    hpa_objects,
    kustomization,
    namespace,
    network_policy,
    raycluster,
    rayservice_for,
)
from llmserve_nb.k8s.rollout import rollout_files
from llmserve_nb.k8s.security import API_KEY_FILE, api_key_env_example, api_key_generator, gitignore


def render_manifests(spec: ClusterSpec | None = None) -> dict[str, list[Any]]:
    """Every rendered YAML file of `k8s/`, as relative path -> YAML documents, in a stable order."""
    spec = spec or ClusterSpec()
    base = {
        "namespace.yaml": [namespace(spec)],
        "networkpolicy.yaml": [network_policy(spec)],
        "rayservice-gpu.yaml": [rayservice_for(profile("gpu"), spec, spec.name)],
    }
    one_gpu = spec.model_copy(update={"min_workers": 1, "max_workers": 1})
    # Every app some manifest here serves gets its alert group.
    alerted = [profile(p) for p in ("gpu", "gpu-half", "gpu-quarter", "vllm-gpu", "gpu-v2")]
    return {
        # A base folder of its own: kustomize refuses an overlay that lives inside its base's folder.
        "base/kustomization.yaml": [
            kustomization(resources=list(base), secretGenerator=[api_key_generator(spec)])
        ],
        **{f"base/{rel}": docs for rel, docs in base.items()},
        "rayservice-fractional-gpu.yaml": [
            rayservice_for(profile("gpu-half"), one_gpu, f"{spec.name}-half"),
            rayservice_for(profile("gpu-quarter"), one_gpu, f"{spec.name}-quarter"),
        ],
        # The GPU image serves both backends (k8s/image/Dockerfile installs the [vllm] extra).
        "rayservice-vllm-gpu.yaml": [rayservice_for(profile("vllm-gpu"), spec, f"{spec.name}-vllm")],
        "raycluster-notebook.yaml": [raycluster(spec, f"{spec.name}-notebook")],
        "overlays/cpu/kustomization.yaml": [
            kustomization(
                resources=["../../base"],
                patches=[
                    {
                        "path": "rayservice-cpu-patch.yaml",
                        "target": {"group": "ray.io", "version": "v1", "kind": "RayService", "name": spec.name},
                    }
                ],
            )
        ],
        "overlays/cpu/rayservice-cpu-patch.yaml": [cpu_patch(spec)],
        **hpa_objects(spec),
        "observability/kustomization.yaml": [
            kustomization(resources=["podmonitors.yaml", "prometheusrule.yaml", "grafana-dashboard-configmap.yaml"])
        ],
        "observability/podmonitors.yaml": pod_monitors(spec),
        "observability/prometheusrule.yaml": [prometheus_rule(alerted, spec)],
        "observability/grafana-dashboard-configmap.yaml": [dashboard_configmap(spec)],
        **rollout_files(spec),
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (serveConfigV2, the dashboard JSON) as literal blocks, so they stay readable.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump_file(docs: list[Any]) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)
    return HEADER + body


def render_files(spec: ClusterSpec | None = None) -> dict[str, str]:
    """Every generated file of `k8s/` (YAML and the rest), as relative path -> text."""
    spec = spec or ClusterSpec()
    files = {rel: _dump_file(docs) for rel, docs in render_manifests(spec).items()}
    files[f"base/{API_KEY_FILE}.example"] = api_key_env_example(spec)
    files["base/.gitignore"] = gitignore()
    # The same JSON as in the ConfigMap, for importing by hand into Grafana.
    files["observability/grafana-dashboard.json"] = dashboard_json()
    return files


def write_manifests(out: str | Path = "k8s", spec: ClusterSpec | None = None) -> list[Path]:
    """Render and write the `k8s/` tree; returns the written paths. Hand-written files are left alone."""
    written = []
    for rel, text in render_files(spec).items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def check_manifests(out: str | Path = "k8s", spec: ClusterSpec | None = None) -> list[str]:
    """Unified diffs between committed files and a fresh render, plus generated-looking files render no longer makes."""
    problems = []
    rendered = render_files(spec)
    for rel, want in rendered.items():
        path = Path(out) / rel
        have = path.read_text() if path.exists() else ""
        if have != want:
            problems.append(
                "".join(
                    difflib.unified_diff(
                        have.splitlines(keepends=True),
                        want.splitlines(keepends=True),
                        fromfile=f"{path} (committed)",
                        tofile=f"{path} (rendered)",
                    )
                )
                or f"{path}: missing\n"
            )
    for path in sorted(p for p in Path(out).rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel not in rendered and _generated(path):
            problems.append(f"{path}: generated file that render-k8s no longer produces; delete it\n")
    return problems


def _generated(path: Path) -> bool:
    try:
        return path.read_text().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
