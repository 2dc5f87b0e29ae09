"""Rollout, Kubernetes side: KubeRay v1.7 incremental upgrades of the GPU RayService, and a second version
behind a Gateway API HTTPRoute with a weighted split (k8s/components/rollout/, which k8s/overlays/rollout/
includes).

With `upgradeStrategy.type: NewClusterWithIncrementalUpgrade` KubeRay itself creates and owns the Gateway
`<name>-gateway` (listener `http`, port 80, the configured GatewayClass) and the HTTPRoute `<name>-httproute`
(rayservice_controller.go, createGateway/createHTTPRoute), and moves that route's weights from the old
cluster to the new one. Rendering objects of those names would fight the operator, so the split to the
second version lives on a Gateway of its own. All of it is a kustomize Component (components/rollout/) that an
overlay including the GPU RayService adds (overlays/rollout/).
"""

from __future__ import annotations

from typing import Any

from llmserve_nb.k8s.options import NAME_LABEL, PORTS, ClusterSpec
from llmserve_nb.k8s.profiles import profile
from llmserve_nb.k8s.components import Files, component
from llmserve_nb.k8s.render import meta, rayservice_for, worker_pdb

GATEWAY_API = "gateway.networking.k8s.io/v1"
# KubeRay names a RayService's Serve Service `<rayservice>-serve-svc` (utils.GenerateServeServiceName);
# it always points at the active cluster.
SERVE_SVC_SUFFIX = "-serve-svc"
# Gateway API implementations label the pods of a Gateway's data plane with the Gateway's name.
GATEWAY_POD_LABEL = "gateway.networking.k8s.io/gateway-name"


def upgrade_strategy(spec: ClusterSpec) -> dict[str, Any]:
    r = spec.rollout
    return {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "gatewayClassName": r.gateway_class_name,
            "maxSurgePercent": r.max_surge_percent,
            "stepSizePercent": r.step_size_percent,
            "intervalSeconds": r.interval_seconds,
        },
    }


def incremental_patch(spec: ClusterSpec) -> list[dict[str, Any]]:
    """JSON6902 patch turning the base GPU RayService into one upgraded incrementally."""
    return [{"op": "add", "path": "/spec/upgradeStrategy", "value": upgrade_strategy(spec)}]


def rollout_rayservice(spec: ClusterSpec | None = None) -> dict[str, Any]:
    """The GPU RayService as k8s/overlays/rollout/ produces it: the base one plus the incremental upgrade."""
    spec = spec or ClusterSpec()
    svc = rayservice_for(profile("gpu"), spec, spec.name)
    svc["spec"]["upgradeStrategy"] = upgrade_strategy(spec)
    return svc


def v2_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-v2"


def v2_rayservice(spec: ClusterSpec) -> dict[str, Any]:
    """The second version: its own RayService (and cluster) on the v2 image, serving Serve app `llm-v2`."""
    return rayservice_for(profile("gpu-v2"), spec.model_copy(update={"image": spec.rollout.v2_image}), v2_name(spec))


def public_gateway_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-public"


def gateway(spec: ClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": GATEWAY_API,
        "kind": "Gateway",
        "metadata": meta(public_gateway_name(spec)),
        "spec": {
            "gatewayClassName": spec.rollout.gateway_class_name,
            "listeners": [
                {"name": "http", "protocol": "HTTP", "port": 80, "allowedRoutes": {"namespaces": {"from": "Same"}}}
            ],
        },
    }


def _backend(service: str, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"kind": "Service", "name": f"{service}{SERVE_SVC_SUFFIX}", "port": PORTS["serve"]}
    if weight is not None:
        ref["weight"] = weight
    return ref


def split_route(spec: ClusterSpec) -> dict[str, Any]:
    """`/v2/...` always reaches the second version (prefix stripped); everything else is split by weight."""
    v2_weight = spec.rollout.v2_weight_percent
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": meta(f"{spec.name}-split"),
        "spec": {
            "parentRefs": [{"name": public_gateway_name(spec), "sectionName": "http"}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
                        }
                    ],
                    "backendRefs": [_backend(v2_name(spec))],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [_backend(spec.name, 100 - v2_weight), _backend(v2_name(spec), v2_weight)],
                },
            ],
        },
    }


def gateway_network_policy(spec: ClusterSpec) -> dict[str, Any]:
    """Lets the gateway data plane reach Serve: in the Gateway's namespace (Istio) or the controller's."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(f"{spec.name}-gateway-to-serve"),
        "spec": {
            "podSelector": {"matchLabels": dict(NAME_LABEL)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchExpressions": [{"key": GATEWAY_POD_LABEL, "operator": "Exists"}]}},
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": spec.rollout.gateway_namespace}
                            }
                        },
                    ],
                    "ports": [{"protocol": "TCP", "port": PORTS["serve"]}],
                }
            ],
        },
    }


def rollout_component(spec: ClusterSpec) -> Files:
    """components/rollout/: the incremental upgrade of RayService `<name>` plus the second version behind a split."""
    return {
        "kustomization.yaml": [
            component(
                resources=["rayservice-v2.yaml", "gateway.yaml", "httproute-split.yaml", "networkpolicy-gateway.yaml"],
                patches=[
                    {
                        "path": "rayservice-incremental-patch.yaml",
                        "target": {"group": "ray.io", "version": "v1", "kind": "RayService", "name": spec.name},
                    }
                ],
            )
        ],
        "rayservice-incremental-patch.yaml": [incremental_patch(spec)],
        "rayservice-v2.yaml": [v2_rayservice(spec), worker_pdb(v2_name(spec))],
        "gateway.yaml": [gateway(spec)],
        "httproute-split.yaml": [split_route(spec)],
        "networkpolicy-gateway.yaml": [gateway_network_policy(spec)],
    }
