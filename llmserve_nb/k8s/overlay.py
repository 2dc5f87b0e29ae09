"""One app's kustomization: what `k8s/base/` holds for the GPU profile, and what `llmserve-nb k8s render --config`
writes for a user's own `AppConfig` (self-contained: it does not need this repository's `k8s/`).
"""

from __future__ import annotations

from llmserve_nb.config import AppConfig
from llmserve_nb.k8s.components import (
    Files,
    component,
    hf_token_component,
    kustomization,
    model_cache_pvc_component,
)
from llmserve_nb.k8s.observability import pod_monitors, prometheus_rule
from llmserve_nb.k8s.options import CPU_CLUSTER, ClusterSpec
from llmserve_nb.k8s.render import (
    egress_policies,
    namespace,
    network_policy,
    rayservice_for,
    service_account,
    worker_pdb,
)
from llmserve_nb.k8s.security import API_KEY_FILE, api_key_env_example, api_key_generator, gitignore


def app_files(app: AppConfig, spec: ClusterSpec, name: str, *, folder: str, rayservice_file: str) -> Files:
    """The kustomization of one RayService with everything a platform team expects next to it: namespace,
    ServiceAccount, ingress and egress NetworkPolicies, the workers' PodDisruptionBudget and the API-key Secret
    from a git-ignored file. `folder` is where it will live (for the instructions in the templates)."""
    resources = {
        "namespace.yaml": [namespace(spec)],
        "serviceaccount.yaml": [service_account(spec)],
        "networkpolicy.yaml": [network_policy(spec), *egress_policies(spec)],
        "pdb.yaml": [worker_pdb(name)],
        rayservice_file: [rayservice_for(app, spec, name)],
    }
    return {
        "kustomization.yaml": [
            kustomization(
                namespace=spec.namespace, resources=list(resources), secretGenerator=[api_key_generator(spec)]
            )
        ],
        **resources,
        f"{API_KEY_FILE}.example": api_key_env_example(spec, folder),
        ".gitignore": gitignore(API_KEY_FILE),
    }


def observability_component(apps: list[AppConfig], spec: ClusterSpec) -> Files:
    """PodMonitors for Ray's metrics port and the alerts of `apps`, in the including overlay's namespace."""
    return {
        "kustomization.yaml": [component(resources=["podmonitors.yaml", "prometheusrule.yaml"])],
        "podmonitors.yaml": pod_monitors(spec),
        "prometheusrule.yaml": [prometheus_rule(apps, spec)],
    }


def _nested(prefix: str, files: Files) -> Files:
    return {f"{prefix}/{rel}": docs for rel, docs in files.items()}


def user_spec(app: AppConfig, *, image: str, namespace: str, name: str) -> ClusterSpec:
    """Pods sized for GPUs when the app asks for GPUs, else as the CPU overlay; the user's image, name, namespace."""
    base = ClusterSpec() if app.deployment.num_gpus else CPU_CLUSTER
    return base.model_copy(update={"image": image, "namespace": namespace, "name": name})


def user_overlay(app: AppConfig, spec: ClusterSpec, out: str) -> Files:
    """What `llmserve-nb k8s render --config` writes to `out`: the app's kustomization (RayService `spec.name`
    serving `app`) and its opt-in Components under components/ (HF token, model cache PVC, observability)."""
    files = app_files(app, spec, spec.name, folder=out, rayservice_file="rayservice.yaml")
    files.update(_nested("components/hf-token", hf_token_component(spec, f"{out}/components/hf-token")))
    files.update(_nested("components/model-cache-pvc", model_cache_pvc_component(spec)))
    files.update(_nested("components/observability", observability_component([app], spec)))
    return files
