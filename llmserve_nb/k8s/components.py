"""Kustomize Components (kind: Component) an overlay includes to opt in: the optional Hugging Face token
Secret and the model cache on a PersistentVolumeClaim. The observability, rollout and HPA Components are
assembled from their own modules in `tree`.
"""

from __future__ import annotations

from typing import Any

from llmserve_nb.k8s.options import NAME_LABEL, ClusterSpec
from llmserve_nb.k8s.pods import MODEL_CACHE_VOLUME
from llmserve_nb.k8s.security import HF_TOKEN_FILE, gitignore, hf_token_env_example, hf_token_generator

# A file of a rendered folder: YAML documents, or text written as it is.
Files = dict[str, "list[Any] | str"]
# Index of the model-cache volume in a worker pod's volumes (pods.volumes: /dev/shm first).
_CACHE_VOLUME_INDEX = 1
_WORKER_VOLUMES = "/spec/rayClusterConfig/workerGroupSpecs/0/template/spec/volumes"


def kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def component(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component", **fields}


def hf_token_component(spec: ClusterSpec, folder: str) -> Files:
    """The HF-token Secret from a git-ignored env file. The pods' reference is optional, so leaving this
    Component out (or creating the Secret another way) is fine."""
    return {
        "kustomization.yaml": [component(secretGenerator=[hf_token_generator(spec)])],
        f"{HF_TOKEN_FILE}.example": hf_token_env_example(spec, folder),
        ".gitignore": gitignore(HF_TOKEN_FILE),
    }


def model_cache_claim_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-model-cache"


def model_cache_pvc_component(spec: ClusterSpec) -> Files:
    """Every RayService's workers cache models on one PVC instead of a per-pod emptyDir, so a new pod (an
    upgrade, a rescheduled worker, a scale-up) starts without downloading. Several workers mount it at once,
    hence ReadWriteMany (NFS, EFS, Filestore, CephFS...); with ReadWriteOnce storage keep one worker."""
    claim = model_cache_claim_name(spec)
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "labels": dict(NAME_LABEL)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": spec.model_cache_size}}},
    }
    path = f"{_WORKER_VOLUMES}/{_CACHE_VOLUME_INDEX}"
    # `test` first: should the volume order ever change, the build fails instead of replacing /dev/shm.
    patch = [
        {"op": "test", "path": f"{path}/name", "value": MODEL_CACHE_VOLUME},
        {"op": "replace", "path": path,
         "value": {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}},
    ]
    return {
        "kustomization.yaml": [
            component(
                resources=["pvc.yaml"],
                patches=[{"path": "rayservice-patch.yaml",
                          "target": {"group": "ray.io", "version": "v1", "kind": "RayService"}}],
            )
        ],
        "pvc.yaml": [pvc],
        "rayservice-patch.yaml": [patch],
    }
