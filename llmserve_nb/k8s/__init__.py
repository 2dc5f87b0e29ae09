"""Kubernetes manifests for llmserve_nb: typed options, rendering of `k8s/`, and validation.

Every manifest under `k8s/` is rendered from the `AppConfig` profiles and a `ClusterSpec`, so each RayService
`serveConfigV2` is byte for byte the Serve config a notebook deploys. Modules, one per concern:
`options` (ClusterSpec and constants), `profiles` (the AppConfigs), `render` (Ray clusters, services and
their pods), `security` (API-key Secret, Ray token auth), `observability` (PodMonitors, alerts, dashboard),
`rollout` (incremental upgrades, Gateway API split), `tree` (the file layout, drift check), `validate`
(CRDs, core schemas, KubeRay's rules), `cli`.
"""

from llmserve_nb.k8s.cli import add_cli
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
from llmserve_nb.k8s.profiles import PROFILE_NAMES, profile
from llmserve_nb.k8s.render import cpu_rayservice, rayservice, serve_config_yaml
from llmserve_nb.k8s.rollout import rollout_rayservice
from llmserve_nb.k8s.security import auth_token_secret_name
from llmserve_nb.k8s.tree import check_manifests, render_files, render_manifests, write_manifests
from llmserve_nb.k8s.validate import CRD_ENV, crd_dir, validate_files, validate_manifest, validation_report

__all__ = [
    "API_KEY_ENV",
    "AlertSpec",
    "CRD_ENV",
    "ClusterSpec",
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
    "grafana_dashboard",
    "profile",
    "rayservice",
    "render_files",
    "render_manifests",
    "rollout_rayservice",
    "serve_config_yaml",
    "validate_files",
    "validate_manifest",
    "validation_report",
    "write_manifests",
]
