"""The whole `k8s/` tree: which file holds what, writing it, and the drift check."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from llmserve_nb.k8s.components import (
    Files,
    component,
    hf_token_component,
    kustomization,
    model_cache_pvc_component,
)
from llmserve_nb.k8s.hpa import hpa_objects, prometheus_adapter_values
from llmserve_nb.k8s.observability import dashboard_configmap, dashboard_json
from llmserve_nb.k8s.options import HEADER, ClusterSpec
from llmserve_nb.k8s.overlay import app_files, observability_component
from llmserve_nb.k8s.profiles import profile
from llmserve_nb.k8s.render import cpu_patch, raycluster, rayservice_for, worker_pdb
from llmserve_nb.k8s.rollout import rollout_component


def _nested(prefix: str, files: Files) -> Files:
    return {f"{prefix}/{rel}": docs for rel, docs in files.items()}


def _extra(spec: ClusterSpec, file: str, docs: list[Any]) -> Files:
    """A RayService/RayCluster besides the base one: its own kustomization, in the base's namespace."""
    return {"kustomization.yaml": [kustomization(namespace=spec.namespace, resources=[file])], file: docs}


def _tree(spec: ClusterSpec) -> Files:
    one_gpu = spec.model_copy(update={"min_workers": 1, "max_workers": 1})
    half, quarter, vllm, notebook = (f"{spec.name}-{s}" for s in ("half", "quarter", "vllm", "notebook"))
    hpa_workers, hpa = hpa_objects(spec)
    # Every app some manifest here serves gets its alert group.
    alerted = [profile(p) for p in ("gpu", "gpu-half", "gpu-quarter", "vllm-gpu", "gpu-v2")]
    target = {"group": "ray.io", "version": "v1", "kind": "RayService", "name": spec.name}
    return {
        # A base folder of its own: kustomize refuses an overlay that lives inside its base's folder.
        **_nested("base", app_files(profile("gpu"), spec, spec.name, folder="k8s/base",
                                    rayservice_file="rayservice-gpu.yaml")),
        "overlays/cpu/kustomization.yaml": [
            kustomization(resources=["../../base"], patches=[{"path": "rayservice-cpu-patch.yaml", "target": target}])
        ],
        "overlays/cpu/rayservice-cpu-patch.yaml": [cpu_patch(spec)],
        "overlays/rollout/kustomization.yaml": [
            # An overlay's own namespace: its base's does not reach the objects its Components add.
            kustomization(namespace=spec.namespace, resources=["../../base"],
                          components=["../../components/rollout", "../../components/observability"])
        ],
        "overlays/notebook-hpa/kustomization.yaml": [
            kustomization(namespace=spec.namespace, resources=["../../extras/notebook"],
                          components=["../../components/hpa"])
        ],
        **_nested("extras/fractional-gpu", _extra(spec, "rayservices.yaml", [
            rayservice_for(profile("gpu-half"), one_gpu, half), worker_pdb(half),
            rayservice_for(profile("gpu-quarter"), one_gpu, quarter), worker_pdb(quarter),
        ])),
        # The GPU image serves both backends (k8s/image/Dockerfile installs the [vllm] extra).
        **_nested("extras/vllm-gpu", _extra(spec, "rayservice.yaml", [
            rayservice_for(profile("vllm-gpu"), spec, vllm), worker_pdb(vllm)])),
        **_nested("extras/notebook", _extra(spec, "raycluster.yaml", [
            raycluster(spec, notebook), worker_pdb(notebook)])),
        **_nested("components/observability", observability_component(alerted, spec)),
        **_nested("components/rollout", rollout_component(spec)),
        "components/hpa/kustomization.yaml": [component(resources=["ray-gpu-workers.yaml", "hpa.yaml"])],
        "components/hpa/ray-gpu-workers.yaml": [hpa_workers],
        "components/hpa/hpa.yaml": [hpa],
        # Helm values for prometheus-adapter, not a Kubernetes object: no kustomization names it.
        "components/hpa/prometheus-adapter-values.yaml": [prometheus_adapter_values()],
        **_nested("components/hf-token", hf_token_component(spec, "k8s/components/hf-token")),
        **_nested("components/model-cache-pvc", model_cache_pvc_component(spec)),
        # Grafana's namespace, not the app's: one dashboard for every app, where Grafana's sidecar looks.
        "grafana/kustomization.yaml": [
            kustomization(namespace=spec.monitoring_namespace, resources=["grafana-dashboard-configmap.yaml"])
        ],
        "grafana/grafana-dashboard-configmap.yaml": [dashboard_configmap(spec)],
        # The same JSON as in the ConfigMap, for importing by hand into Grafana.
        "grafana/grafana-dashboard.json": dashboard_json(),
    }


def render_manifests(spec: ClusterSpec | None = None) -> dict[str, list[Any]]:
    """Every rendered YAML file of `k8s/`, as relative path -> YAML documents, in a stable order."""
    return {rel: docs for rel, docs in _tree(spec or ClusterSpec()).items() if not isinstance(docs, str)}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (serveConfigV2, the dashboard JSON) as literal blocks, so they stay readable.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump_body(docs: list[Any]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


def render_files(spec: ClusterSpec | None = None) -> dict[str, str]:
    """Every generated file of `k8s/` (YAML and the rest), as relative path -> text."""
    return dump_files(_tree(spec or ClusterSpec()))


def dump_files(files: Files, header: str = HEADER) -> dict[str, str]:
    """Rendered files as text: YAML documents dumped under `header`; text as it is, its HEADER (if any,
    JSON has none) swapped for `header`."""
    return {rel: _text(docs, header) for rel, docs in files.items()}


def _text(docs: list[Any] | str, header: str) -> str:
    if not isinstance(docs, str):
        return header + _dump_body(docs)
    return header + docs.removeprefix(HEADER) if docs.startswith(HEADER) else docs


def write_files(out: str | Path, texts: dict[str, str]) -> list[Path]:
    written = []
    for rel, text in texts.items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def write_manifests(out: str | Path = "k8s", spec: ClusterSpec | None = None) -> list[Path]:
    """Render and write the `k8s/` tree; returns the written paths. Hand-written files are left alone."""
    return write_files(out, render_files(spec))


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
            problems.append(f"{path}: generated file that `llmserve-nb k8s render` no longer produces; delete it\n")
    return problems


def _generated(path: Path) -> bool:
    try:
        return path.read_text().startswith(HEADER)
    except (OSError, UnicodeDecodeError):
        return False
