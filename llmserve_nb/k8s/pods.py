"""The pods of a Ray cluster: containers, security settings, volumes (/dev/shm, model cache, the autoscaler's API
token), the dedicated ServiceAccount, the optional Hugging Face token, and the probes KubeRay does not inject.

KubeRay v1.7 injects liveness and readiness probes into the Ray container of every head and worker pod it
creates when the container has none (`initLivenessAndReadinessProbe` in ray-operator/controllers/ray/common/pod.go,
on unless the operator runs with ENABLE_PROBES_INJECTION=false). For RayService workers its readiness probe also
checks the Serve proxy (`/-/healthz` on the `serve` port), which is what takes a worker out of the Serve Service.
Explicit probes there would replace that, so Ray containers KubeRay manages get none from us; the pods KubeRay does
not create (the opt-in HPA workers) get the same node health check explicitly (`node_probes`).
"""

from __future__ import annotations

from typing import Any

from llmserve_nb.k8s.options import (
    API_KEY_ENV,
    API_KEY_SECRET_KEY,
    DASHBOARD_AGENT_PORT,
    HF_TOKEN_ENV,
    HF_TOKEN_SECRET_KEY,
    MODEL_CACHE_PATH,
    NAME_LABEL,
    NODE_HEALTH_PATH,
    PORTS,
    RAY_GID,
    RAY_UID,
    ClusterSpec,
)
from llmserve_nb.k8s.security import auth_options

SHM_VOLUME = "dshm"
MODEL_CACHE_VOLUME = "model-cache"
API_TOKEN_VOLUME = "kube-api-access"
# Where in-cluster Kubernetes clients (the Ray autoscaler's among them) read their credentials.
API_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def resources(cpu: str, memory: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    # Requests equal limits: Ray sizes its logical resources from them, and a burstable pod gets OOM-killed first.
    limits = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"limits": limits, "requests": dict(limits)}


def node_probes() -> dict[str, Any]:
    """The probes KubeRay v1.7 injects for Ray >= 2.53 (`/api/healthz` of the dashboard agent: raylet, and GCS on
    the head; exempt from Ray's token auth), with KubeRay's timings, for Ray pods KubeRay does not create."""
    check = {"httpGet": {"path": NODE_HEALTH_PATH, "port": DASHBOARD_AGENT_PORT}}
    return {
        "livenessProbe": {**check, "initialDelaySeconds": 30, "periodSeconds": 5, "timeoutSeconds": 2,
                          "failureThreshold": 120},
        "readinessProbe": {**check, "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 10},
    }


def hf_token_env(spec: ClusterSpec) -> dict[str, Any]:
    """HF_TOKEN from the optional Secret: gated or private models load with it, public ones without it."""
    ref = {"name": spec.hf_token_secret, "key": HF_TOKEN_SECRET_KEY, "optional": True}
    return {"name": HF_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}}


def ray_container(
    spec: ClusterSpec,
    name: str,
    res: dict[str, Any],
    ports: list[str],
    env: dict[str, str] | None = None,
    loads_models: bool = False,
) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent"}
    if ports:
        c["ports"] = [{"name": p, "containerPort": PORTS[p]} for p in ports]
    key = {"secretKeyRef": {"name": spec.api_key_secret, "key": API_KEY_SECRET_KEY}}
    c["env"] = [
        {"name": API_KEY_ENV, "valueFrom": key},
        *([hf_token_env(spec)] if loads_models else []),
        *({"name": k, "value": v} for k, v in (env or {}).items()),
    ]
    c["resources"] = res
    c["securityContext"] = container_security()
    # Ray's object store lives in /dev/shm; the container default (64Mi) is far too small.
    c["volumeMounts"] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if loads_models:
        # HF_HOME (~/.cache/huggingface, its default) and the converted-model cache (~/.cache/llmserve_nb) live
        # here, so a restarted container finds the weights it already downloaded.
        c["volumeMounts"].append({"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH})
    return c


def volumes(shm: str, spec: ClusterSpec, loads_models: bool) -> list[dict[str, Any]]:
    # A memory-backed emptyDir counts against the container's memory limit; the sizeLimit keeps the object
    # store from growing into the memory the replicas need (Ray caps the store to /dev/shm's size).
    out = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    if loads_models:
        # Survives container restarts, not pod deletion; components/model-cache-pvc swaps in a PVC.
        out.append({"name": MODEL_CACHE_VOLUME, "emptyDir": {"sizeLimit": spec.model_cache_size}})
    return out


def api_token_volume() -> dict[str, Any]:
    """What the kubelet mounts when automounting is on, as a volume only the autoscaler sidecar mounts."""
    return {
        "name": API_TOKEN_VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [
                    {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                ]}},
            ]
        },
    }


def pod_template(
    spec: ClusterSpec, app_name: str, container: dict[str, Any], vols: list[dict[str, Any]], gpu: bool
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        # Ray's own processes never call the Kubernetes API; only the head's autoscaler sidecar does, and it
        # gets the token through its own volume mount (autoscalerOptions.volumeMounts).
        "serviceAccountName": spec.service_account,
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": vols,
    }
    if gpu and spec.gpu is not None:
        pod["nodeSelector"] = {**spec.gpu.node_selector, **spec.gpu.accelerator_label}
        pod["tolerations"] = [dict(t) for t in spec.gpu.tolerations]
    return {"metadata": {"labels": {**NAME_LABEL, "app.kubernetes.io/instance": app_name}}, "spec": pod}


def worker_group(spec: ClusterSpec, app_name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    gpu = spec.gpu is not None
    extra = {spec.gpu.resource: str(spec.gpu.per_worker)} if spec.gpu is not None else None
    container = ray_container(
        spec, "ray-worker", resources(spec.worker_cpu, spec.worker_memory, extra), ["metrics"], env, loads_models=True
    )
    return {
        "groupName": "gpu-workers" if gpu else "cpu-workers",
        "replicas": spec.min_workers,
        "minReplicas": spec.min_workers,
        "maxReplicas": spec.max_workers,
        "rayStartParams": {},
        "template": pod_template(spec, app_name, container, volumes(spec.worker_shm, spec, True), gpu),
    }


def ray_cluster_spec(spec: ClusterSpec, app_name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    head = ray_container(spec, "ray-head", resources(spec.head_cpu, spec.head_memory), list(PORTS), env)
    cluster: dict[str, Any] = {"rayVersion": spec.ray_version}
    if (auth := auth_options(spec)) is not None:
        cluster["authOptions"] = auth
    head_template = pod_template(spec, app_name, head, volumes(spec.head_shm, spec, False), gpu=False)
    head_template["spec"]["volumes"].append(api_token_volume())
    return {
        **cluster,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": spec.idle_timeout_s,
            "resources": resources("500m", "512Mi"),
            "securityContext": container_security(),
            # KubeRay binds its autoscaler Role to the head's ServiceAccount (ours); the token reaches only here.
            "volumeMounts": [{"name": API_TOKEN_VOLUME, "mountPath": API_TOKEN_PATH, "readOnly": True}],
        },
        "headGroupSpec": {
            # num-cpus 0 keeps model replicas off the head, so a replica's OOM cannot take the GCS down.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": head_template,
        },
        "workerGroupSpecs": [worker_group(spec, app_name, env)],
    }
