"""The autoscaling config of a local cluster with Ray's fake multi-node provider (`autoscaling_config`),
the one KubeRay's autoscaler derives from the RayCluster this package renders
(`kuberay_autoscaling_config`), and the two side by side (`correspondence`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve_nb.k8s.options import ClusterSpec

__all__ = ["HEAD_NODE_TYPE", "OBJECT_STORE_BYTES", "WORKER_NODE_TYPE", "autoscaling_config", "correspondence",
           "kuberay_autoscaling_config"]

# The fake provider registers its head under this type name; the config must use it too.
HEAD_NODE_TYPE = "ray.head.default"
# KubeRay names a worker node type after its workerGroupSpec; use the name this package renders.
WORKER_NODE_TYPE = "cpu-workers"
OBJECT_STORE_BYTES = 200 * 2**20  # each node's plasma store; Ray's default (30% of RAM per node) adds up fast


def autoscaling_config(
    gcs_address: str,
    *,
    head_cpus: int = 1,
    worker_cpus: int = 1,
    max_workers: int = 2,
    min_workers: int = 0,
    idle_timeout_s: float = 15.0,
    upscaling_speed: float = 1.0,
    cluster_name: str = "llmserve-nb-local",
) -> dict[str, Any]:
    """The cluster config `ray start --autoscaling-config` reads, for the fake multi-node provider.

    Everything Ray's validator (`ray-schema.json`) and the v1 autoscaler read is present, so nothing
    falls back to provider defaults meant for real clouds (auth, docker, setup commands are unused by
    this provider but required to exist).
    """
    if not 0 <= min_workers <= max_workers:
        raise ValueError(f"need 0 <= min_workers ({min_workers}) <= max_workers ({max_workers})")
    if head_cpus < 0 or worker_cpus < 1:
        raise ValueError("head_cpus must be >= 0 and worker_cpus >= 1")
    if idle_timeout_s < 0:
        raise ValueError("idle_timeout_s must be >= 0")
    return {
        "cluster_name": cluster_name,
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        # The v1 autoscaler reads minutes (any number); KubeRay's idleTimeoutSeconds is the same knob.
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            # Without it the provider assumes the GCS listens on 6379, which may be another cluster's.
            "gcs_address": gcs_address,
            # One node per launch request, as a cloud with slow instance starts would (v1 default).
            "launch_multiple": False,
            # All nodes share one IP here, so the autoscaler must tell them apart by node id.
            "use_node_id_as_ip": True,
            # No SSH, no setup commands: the provider starts Ray itself (as KubeRay's pods do).
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_NODE_TYPE: {
                # The provider passes these to the node it starts: CPU as --num-cpus, object_store_memory
                # as the plasma size; the autoscaler plans with the same numbers.
                "resources": {"CPU": worker_cpus, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": min_workers,
                "max_workers": max_workers,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def kuberay_autoscaling_config(spec: ClusterSpec | None = None, name: str = "llm-notebook") -> dict[str, Any]:
    """The autoscaling config KubeRay's in-tree autoscaler derives from the RayCluster this package
    renders (`llmserve_nb.k8s.render.raycluster`, what `k8s/extras/notebook/raycluster.yaml` holds).

    The autoscaler sidecar reads the RayCluster and calls Ray's own
    `_derive_autoscaling_config_from_ray_cr` on it; so does this function, offline. `spec` is a
    `llmserve_nb.k8s.options.ClusterSpec` (default: the CPU profile, with a 0..2 worker group).
    """
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from llmserve_nb.k8s.options import CPU_CLUSTER
    from llmserve_nb.k8s.render import raycluster

    spec = spec or CPU_CLUSTER.model_copy(update={"min_workers": 0, "max_workers": 2})
    cr = raycluster(spec, name)
    # The rendered object leaves its namespace to kustomize; the sidecar reads it from the API server, which
    # always fills it in.
    cr["metadata"].setdefault("namespace", spec.namespace)
    return _derive_autoscaling_config_from_ray_cr(cr)


def correspondence(local: dict[str, Any], kuberay: dict[str, Any]) -> list[dict[str, Any]]:
    """Side by side: each autoscaler setting in the local config and in KubeRay's, with the RayCluster
    field it comes from there. Worker types are matched by name (KubeRay's are the `groupName`s)."""
    def worker_types(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}

    rows = [
        {"setting": "provider.type", "local": local["provider"]["type"], "kuberay": kuberay["provider"]["type"],
         "RayCluster field": "spec.enableInTreeAutoscaling: true (the autoscaler sidecar in the head pod)"},
        {"setting": "idle_timeout_minutes", "local": local["idle_timeout_minutes"],
         "kuberay": kuberay["idle_timeout_minutes"], "RayCluster field": "spec.autoscalerOptions.idleTimeoutSeconds / 60"},
        {"setting": "upscaling_speed", "local": local["upscaling_speed"], "kuberay": kuberay["upscaling_speed"],
         "RayCluster field": "spec.autoscalerOptions.upscalingMode (Conservative = 1, else 1000)"},
        {"setting": "max_workers (all types)", "local": local["max_workers"], "kuberay": kuberay["max_workers"],
         "RayCluster field": "sum of workerGroupSpecs[].maxReplicas"},
        {"setting": "head node type: CPU", "local": local["available_node_types"][local["head_node_type"]]["resources"].get("CPU"),
         "kuberay": kuberay["available_node_types"][kuberay["head_node_type"]]["resources"].get("CPU"),
         "RayCluster field": "headGroupSpec.rayStartParams.num-cpus"},
    ]
    kr_workers = worker_types(kuberay)
    for wname, w in worker_types(local).items():
        kw = kr_workers.get(wname, {})
        field = f"workerGroupSpecs[groupName={wname}]"
        for key, kr_field in (("min_workers", "minReplicas"), ("max_workers", "maxReplicas")):
            rows.append({"setting": f"{wname}: {key}", "local": w[key], "kuberay": kw.get(key),
                         "RayCluster field": f"{field}.{kr_field}"})
        rows.append({"setting": f"{wname}: CPU", "local": w["resources"].get("CPU"),
                     "kuberay": (kw.get("resources") or {}).get("CPU"),
                     "RayCluster field": f"{field}: container CPU limit (or rayStartParams.num-cpus)"})
    return rows
