"""The Ray side of `k8s/`: RayServices, RayClusters, their pods, the namespace, NetworkPolicy, CPU overlay, HPA.

Every RayService `serveConfigV2` is the YAML of `llmserve_nb.backends.serve_config(app)`, byte for byte the
Serve config a notebook deploys.
"""

from __future__ import annotations

from typing import Any

import yaml

from llmserve_nb.backends import backend_for, serve_config
from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig
from llmserve_nb.k8s.options import (
    API_KEY_ENV,
    API_KEY_SECRET_KEY,
    CPU_CLUSTER,
    NAME_LABEL,
    PORTS,
    RAY_GID,
    RAY_UID,
    ClusterSpec,
)
from llmserve_nb.k8s.profiles import profile
from llmserve_nb.k8s.security import auth_options, token_env


def serve_config_yaml(app: AppConfig) -> str:
    """The RayService `serveConfigV2`: the YAML of the same Serve config a notebook deploys."""
    return yaml.safe_dump(serve_config(app), sort_keys=False)


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _resources(cpu: str, memory: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    # Requests equal limits: Ray sizes its logical resources from them, and a burstable pod gets OOM-killed first.
    limits = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"limits": limits, "requests": dict(limits)}


def _ray_container(
    spec: ClusterSpec, name: str, resources: dict[str, Any], ports: list[str], env: dict[str, str] | None = None
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent"}
    if ports:
        c["ports"] = [{"name": p, "containerPort": PORTS[p]} for p in ports]
    key = {"secretKeyRef": {"name": spec.api_key_secret, "key": API_KEY_SECRET_KEY}}
    c["env"] = [{"name": API_KEY_ENV, "valueFrom": key}, *({"name": k, "value": v} for k, v in (env or {}).items())]
    c["resources"] = resources
    c["securityContext"] = _container_security()
    # Ray's object store lives in /dev/shm; the container default (64Mi) is far too small.
    c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    return c


def _pod_template(spec: ClusterSpec, app_name: str, container: dict[str, Any], gpu: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpu and spec.gpu is not None:
        pod["nodeSelector"] = {**spec.gpu.node_selector, **spec.gpu.accelerator_label}
        pod["tolerations"] = [dict(t) for t in spec.gpu.tolerations]
    return {"metadata": {"labels": {**NAME_LABEL, "app.kubernetes.io/instance": app_name}}, "spec": pod}


def _worker_group(spec: ClusterSpec, app_name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    gpu = spec.gpu is not None
    extra = {spec.gpu.resource: str(spec.gpu.per_worker)} if spec.gpu is not None else None
    container = _ray_container(
        spec, "ray-worker", _resources(spec.worker_cpu, spec.worker_memory, extra), ["metrics"], env
    )
    return {
        "groupName": "gpu-workers" if gpu else "cpu-workers",
        "replicas": spec.min_workers,
        "minReplicas": spec.min_workers,
        "maxReplicas": spec.max_workers,
        "rayStartParams": {},
        "template": _pod_template(spec, app_name, container, gpu),
    }


def _ray_cluster_spec(spec: ClusterSpec, app_name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    head = _ray_container(spec, "ray-head", _resources(spec.head_cpu, spec.head_memory), list(PORTS), env)
    cluster: dict[str, Any] = {"rayVersion": spec.ray_version}
    if (auth := auth_options(spec)) is not None:
        cluster["authOptions"] = auth
    return {
        **cluster,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": spec.idle_timeout_s,
            "resources": _resources("500m", "512Mi"),
            "securityContext": _container_security(),
        },
        "headGroupSpec": {
            # num-cpus 0 keeps model replicas off the head, so a replica's OOM cannot take the GCS down.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod_template(spec, app_name, head, gpu=False),
        },
        "workerGroupSpecs": [_worker_group(spec, app_name, env)],
    }


def meta(name: str, spec: ClusterSpec, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace, "labels": {**NAME_LABEL, **labels}}


def rayservice_for(app: AppConfig, spec: ClusterSpec, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta(name, spec, **{"app.kubernetes.io/instance": name}),
        "spec": {
            "serveConfigV2": serve_config_yaml(app),
            "rayClusterConfig": _ray_cluster_spec(spec, name, backend_for(app).cluster_env(app)),
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
        "metadata": meta(name, spec, **{"app.kubernetes.io/instance": name}),
        "spec": _ray_cluster_spec(spec, name),
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
        "metadata": meta(f"{spec.name}-ray", spec),
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
                # The operator reads Serve status through the dashboard.
                {"from": [ns(spec.operator_namespace)], "ports": tcp("dashboard")},
                {"from": [ns(spec.ingress_namespace)], "ports": tcp("serve")},
                {"from": [ns(spec.monitoring_namespace)], "ports": tcp("metrics")},
            ],
        },
    }


def kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def cpu_rayservice(spec: ClusterSpec | None = None) -> dict[str, Any]:
    """The RayService the CPU overlay produces: the embedded model on CPU pods, same name and namespace."""
    spec = spec or ClusterSpec()
    # Who-and-where come from the GPU spec; only sizing, image and GPUs change.
    keep = (
        "name",
        "namespace",
        "ray_version",
        "api_key_secret",
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
            "path": "/spec/rayClusterConfig/workerGroupSpecs",
            "value": cpu["rayClusterConfig"]["workerGroupSpecs"],
        },
    ]


def hpa_objects(spec: ClusterSpec) -> dict[str, list[dict[str, Any]]]:
    cluster = f"{spec.name}-notebook"
    workers = f"{cluster}-hpa-workers"
    group = _worker_group(spec, cluster)
    container = group["template"]["spec"]["containers"][0]
    container["command"] = [
        "ray",
        "start",
        "--block",
        f"--address={cluster}-head-svc.{spec.namespace}.svc.cluster.local:6379",
        "--metrics-export-port=8080",
    ]
    if spec.ray_token_auth:
        # KubeRay injects the token only into pods it creates; these join its cluster on their own.
        container["env"] += token_env(cluster)
    selector = {**NAME_LABEL, "app.kubernetes.io/instance": cluster, "app.kubernetes.io/component": "hpa-workers"}
    template = group["template"]
    template["metadata"]["labels"] = selector
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(workers, spec, **{"app.kubernetes.io/instance": cluster}),
        "spec": {"replicas": spec.min_workers, "selector": {"matchLabels": selector}, "template": template},
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(workers, spec),
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
    series = "ray_serve_deployment_queued_queries"
    adapter = {
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
    return {
        "optional/hpa/kustomization.yaml": [kustomization(resources=["ray-gpu-workers.yaml", "hpa.yaml"])],
        "optional/hpa/ray-gpu-workers.yaml": [deployment],
        "optional/hpa/hpa.yaml": [hpa],
        "optional/hpa/prometheus-adapter-values.yaml": [adapter],
    }
