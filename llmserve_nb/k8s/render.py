"""The Ray side of `k8s/`: RayServices, RayClusters, the namespace, ServiceAccount, NetworkPolicies,
PodDisruptionBudgets and the CPU overlay.

Every RayService `serveConfigV2` is the YAML of `llmserve_nb.backends.serve_config(app)`, byte for byte the
Serve config a notebook deploys. No object names its namespace: the kustomization that includes it sets it
(`namespace:`), so one overlay line moves everything.
"""

from __future__ import annotations

from typing import Any

import yaml

from llmserve_nb.backends import backend_for, serve_config
from llmserve_nb.config import AppConfig
from llmserve_nb.k8s.options import CPU_CLUSTER, NAME_LABEL, PORTS, ClusterSpec
from llmserve_nb.k8s.pods import ray_cluster_spec
from llmserve_nb.k8s.profiles import profile

# Never a destination of the "model source" egress rule: cluster-internal (RFC 1918) ranges and link-local,
# which holds the cloud metadata endpoint (169.254.169.254) with the node's credentials.
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")


def serve_config_yaml(app: AppConfig) -> str:
    """The RayService `serveConfigV2`: the YAML of the same Serve config a notebook deploys."""
    return yaml.safe_dump(serve_config(app), sort_keys=False)


def meta(name: str, **labels: str) -> dict[str, Any]:
    # No namespace: the kustomization including the object sets it.
    return {"name": name, "labels": {**NAME_LABEL, **labels}}


def rayservice_for(app: AppConfig, spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta(name, **{"app.kubernetes.io/instance": name}),
        "spec": {
            "serveConfigV2": serve_config_yaml(app),
            "rayClusterConfig": ray_cluster_spec(spec, name, backend_for(app).cluster_env(app)),
        },
    }


def rayservice(app: AppConfig, spec: ClusterSpec | None = None, name: str | None = None) -> dict[str, Any]:
    """A RayService serving any `AppConfig` (its serveConfigV2 is `serve_config(app)`).

    Without `spec`, pods are sized for GPUs when the app asks for GPUs, else as the CPU overlay.
    """
    spec = spec or (ClusterSpec() if app.deployment.num_gpus else CPU_CLUSTER)
    return rayservice_for(app, spec, name or app.name)


def raycluster(spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": meta(name, **{"app.kubernetes.io/instance": name}),
        "spec": ray_cluster_spec(spec, name),
    }


def namespace(spec: ClusterSpec) -> dict[str, Any]:
    # warn/audit, not enforce: KubeRay injects containers (init, autoscaler) whose settings we do not fully own.
    labels = {"pod-security.kubernetes.io/warn": "restricted", "pod-security.kubernetes.io/audit": "restricted"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace, "labels": labels}}


def network_policy(spec: ClusterSpec) -> dict[str, Any]:
    def tcp(*names: str) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": PORTS[n]} for n in names]

    def ns(name: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(f"{spec.name}-ray"),
        "spec": {
            "podSelector": {"matchLabels": dict(NAME_LABEL)},
            "policyTypes": ["Ingress"],
            "ingress": [
                # Ray nodes talk to each other on many dynamic ports (raylet, object manager, workers).
                {"from": [{"podSelector": {"matchLabels": dict(NAME_LABEL)}}]},
                {
                    "from": [{"podSelector": {"matchLabels": dict(spec.client_label)}}],
                    "ports": tcp("gcs-server", "dashboard", "client", "serve"),
                },
                # The operator reads Serve status through the dashboard and probes the head's Serve proxy
                # (`/-/healthz` on 8000, rayservice_controller.go updateHeadPodServeLabel).
                {"from": [ns(spec.operator_namespace)], "ports": tcp("dashboard", "serve")},
                {"from": [ns(spec.ingress_namespace)], "ports": tcp("serve")},
                {"from": [ns(spec.monitoring_namespace)], "ports": tcp("metrics")},
            ],
        },
    }


def egress_policies(spec: ClusterSpec) -> list[dict[str, Any]]:
    """What Ray pods may reach: DNS, each other and HTTPS outside the cluster (the model source); the head,
    whose autoscaler sidecar patches the RayCluster, also the Kubernetes API.

    Hugging Face serves from CDNs whose addresses change and a NetworkPolicy cannot name hosts, so "443 anywhere
    but private ranges" is the narrowest rule that still downloads models. The API server's address is the
    cluster's own (private, port 443 or 6443 after the Service's DNAT), hence a rule of its own for heads.
    """
    dns = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    ray_pods = {"to": [{"podSelector": {"matchLabels": dict(NAME_LABEL)}}]}
    outside = {"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_RANGES)}}
    model_source = {"to": [outside], "ports": [{"protocol": "TCP", "port": 443}]}
    api_server = {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
    }

    def policy(name: str, selector: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(name),
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Egress"], "egress": rules},
        }

    return [
        policy(f"{spec.name}-ray-egress", dict(NAME_LABEL), [dns, ray_pods, model_source]),
        policy(f"{spec.name}-ray-head-egress", {**NAME_LABEL, "ray.io/node-type": "head"}, [api_server]),
    ]


def service_account(spec: ClusterSpec) -> dict[str, Any]:
    # No token by default for anything that runs as it; the head's autoscaler mounts one explicitly.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(spec.service_account),
        "automountServiceAccountToken": False,
    }


def worker_pdb(instance: str) -> dict[str, Any]:
    """At most one worker of `instance` evicted at a time (node drains, cluster upgrades).

    maxUnavailable, not minAvailable: with minAvailable 1 a one-worker group could never be drained, and a
    drain that never finishes is what platform teams reject. The in-tree autoscaler deletes idle workers
    directly (no eviction), so this never holds up a scale-down. Unhealthy workers may always be evicted.
    KubeRay names a RayService's RayCluster `<name>-<random>`, so the selector is our instance label (on every
    cluster of an upgrade) plus KubeRay's `ray.io/node-type`.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(f"{instance}-workers", **{"app.kubernetes.io/instance": instance}),
        "spec": {
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {
                "matchLabels": {**NAME_LABEL, "app.kubernetes.io/instance": instance, "ray.io/node-type": "worker"}
            },
        },
    }


def cpu_rayservice(spec: ClusterSpec | None = None) -> dict[str, Any]:
    """The RayService the CPU overlay produces: the embedded model on CPU pods, same name and namespace."""
    spec = spec or ClusterSpec()
    # Who-and-where come from the GPU spec; only sizing, image and GPUs change.
    keep = (
        "name",
        "namespace",
        "ray_version",
        "api_key_secret",
        "hf_token_secret",
        "service_account",
        "ray_token_auth",
        "operator_namespace",
        "ingress_namespace",
        "monitoring_namespace",
        "client_label",
    )
    cpu_spec = CPU_CLUSTER.model_copy(update={k: getattr(spec, k) for k in keep})
    return rayservice_for(profile("cpu"), cpu_spec, spec.name)


def cpu_patch(spec: ClusterSpec) -> list[dict[str, Any]]:
    cpu = cpu_rayservice(spec)["spec"]
    head = cpu["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_path = "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0"
    return [
        {"op": "replace", "path": "/spec/serveConfigV2", "value": cpu["serveConfigV2"]},
        {"op": "replace", "path": f"{head_path}/image", "value": head["image"]},
        {"op": "replace", "path": f"{head_path}/resources", "value": head["resources"]},
        {
            "op": "replace",
            "path": "/spec/rayClusterConfig/headGroupSpec/template/spec/volumes",
            "value": cpu["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"],
        },
        {
            "op": "replace",
            "path": "/spec/rayClusterConfig/workerGroupSpecs",
            "value": cpu["rayClusterConfig"]["workerGroupSpecs"],
        },
    ]
