"""Kubernetes manifests for llmserve_nb: typed options, rendering of `k8s/` and of overlays for your own
AppConfig, and validation against CRDs (from a folder or the cluster's API).

Every manifest under `k8s/` is rendered from the `AppConfig` profiles and a `ClusterSpec`, so each RayService
`serveConfigV2` is byte for byte the Serve config a notebook deploys. Modules, one per concern:
`options` (ClusterSpec and constants), `profiles` (the AppConfigs), `pods` (containers, volumes, probes,
ServiceAccount), `render` (Ray clusters and services, NetworkPolicies, PodDisruptionBudgets), `security`
(Secrets, Ray token auth), `components` (kustomize Components), `overlay` (one app's kustomization),
`observability` (PodMonitors, alerts, dashboard), `rollout` (incremental upgrades, Gateway API split),
`hpa` (the opt-in HPA), `tree` (the file layout, drift check), `crds` (CRD sources), `validate` (CRDs,
core schemas, KubeRay's rules), `cli`. None imports ray or torch at import or render time.
"""

from llmserve_nb.k8s.cli import add_cli
from llmserve_nb.k8s.crds import CRD_ENV, ClusterCrds, CrdDirectory, CrdSource, crd_dir, crd_source
from llmserve_nb.k8s.observability import all_promql_expressions, alerts, grafana_dashboard
from llmserve_nb.k8s.options import (
    API_KEY_ENV,
    HEADER,
    AlertSpec,
    ClusterSpec,
    GpuSpec,
    ManifestError,
    RolloutSpec,
)
from llmserve_nb.k8s.overlay import user_overlay, user_spec
from llmserve_nb.k8s.profiles import PROFILE_NAMES, profile
from llmserve_nb.k8s.render import cpu_rayservice, rayservice, serve_config_yaml
from llmserve_nb.k8s.rollout import rollout_rayservice
from llmserve_nb.k8s.security import auth_token_secret_name
from llmserve_nb.k8s.tree import check_manifests, render_files, render_manifests, write_manifests
from llmserve_nb.k8s.validate import validate_files, validate_manifest, validation_report

__all__ = [
    "API_KEY_ENV",
    "AlertSpec",
    "CRD_ENV",
    "ClusterCrds",
    "ClusterSpec",
    "CrdDirectory",
    "CrdSource",
    "GpuSpec",
    "HEADER",
    "ManifestError",
    "PROFILE_NAMES",
    "RolloutSpec",
    "add_cli",
    "alerts",
    "all_promql_expressions",
    "auth_token_secret_name",
    "check_manifests",
    "cpu_rayservice",
    "crd_dir",
    "crd_source",
    "grafana_dashboard",
    "profile",
    "rayservice",
    "render_files",
    "render_manifests",
    "rollout_rayservice",
    "serve_config_yaml",
    "user_overlay",
    "user_spec",
    "validate_files",
    "validate_manifest",
    "validation_report",
    "write_manifests",
]
