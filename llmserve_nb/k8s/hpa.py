"""The opt-in HPA (components/hpa): a Deployment of extra Ray workers joining the notebook RayCluster, scaled by
an `autoscaling/v2` HPA on Serve's queue length through prometheus-adapter. A RayCluster has no `/scale`
subresource, so an HPA cannot target it directly.
"""

from __future__ import annotations

from typing import Any

from llmserve_nb.config import DEPLOYMENT_NAME
from llmserve_nb.k8s.options import NAME_LABEL, ClusterSpec
from llmserve_nb.k8s.pods import node_probes, worker_group
from llmserve_nb.k8s.profiles import profile
from llmserve_nb.k8s.render import meta
from llmserve_nb.k8s.security import token_env


def hpa_objects(spec: ClusterSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The extra GPU workers joining RayCluster `<name>-notebook` and the HPA scaling them on Serve's queue."""
    cluster = f"{spec.name}-notebook"
    workers = f"{cluster}-hpa-workers"
    group = worker_group(spec, cluster)
    container = group["template"]["spec"]["containers"][0]
    container["command"] = [
        "ray",
        "start",
        "--block",
        # The head Service's short name resolves in the pods' own namespace, wherever kustomize puts them.
        f"--address={cluster}-head-svc:6379",
        "--metrics-export-port=8080",
    ]
    if spec.ray_token_auth:
        # KubeRay injects the token only into pods it creates; these join its cluster on their own.
        container["env"] += token_env(cluster)
    # KubeRay's probe injection does not reach pods it does not create: the same checks, explicitly.
    container.update(node_probes())
    selector = {**NAME_LABEL, "app.kubernetes.io/instance": cluster, "app.kubernetes.io/component": "hpa-workers"}
    template = group["template"]
    template["metadata"]["labels"] = selector
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(workers, **{"app.kubernetes.io/instance": cluster}),
        "spec": {"replicas": spec.min_workers, "selector": {"matchLabels": selector}, "template": template},
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(workers),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": workers},
            "minReplicas": max(spec.min_workers, 1),
            "maxReplicas": spec.max_workers,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "name": "ray_serve_requests_waiting_or_running",
                            "selector": {"matchLabels": {"application": "llm", "deployment": DEPLOYMENT_NAME}},
                        },
                        "target": {"type": "AverageValue", "averageValue": str(profile("gpu").batching.max_batch_size)},
                    },
                }
            ],
            # Scale down slowly and one pod at a time: each removed pod kills the Serve replicas it runs.
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 600,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                }
            },
        },
    }
    return deployment, hpa


def prometheus_adapter_values() -> dict[str, Any]:
    """Helm values for prometheus-adapter exposing Serve's queue as the HPA's external metric."""
    series = "ray_serve_deployment_queued_queries"
    return {
        "rules": {
            "external": [
                {
                    "seriesQuery": f'{series}{{namespace!="",application!="",deployment!=""}}',
                    "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
                    "name": {"matches": f"^{series}$", "as": "ray_serve_requests_waiting_or_running"},
                    # Waiting in routers plus running in replicas: the load the workers must absorb.
                    "metricsQuery": (
                        f"sum by (application, deployment) ({series}{{<<.LabelMatchers>>}})"
                        " + sum by (application, deployment)"
                        " (ray_serve_num_ongoing_requests_at_replicas{<<.LabelMatchers>>})"
                    ),
                }
            ]
        }
    }
