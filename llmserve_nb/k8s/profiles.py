"""The `AppConfig` profiles the committed manifests serve."""

from __future__ import annotations

from llmserve_nb.config import AppConfig, AutoscalingConfig, BatchingConfig, DeploymentConfig, EngineConfig
from llmserve_nb.k8s.options import ManifestError

# vLLM loads safetensors from the Hub: the embedded GGUF's original, so every profile serves the same model.
VLLM_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _gpu_profile(num_gpus: float, batch: int, wait_s: float, replicas: int | None) -> AppConfig:
    deployment = (
        DeploymentConfig(num_gpus=num_gpus, num_replicas=replicas)
        if replicas
        else DeploymentConfig(
            num_gpus=num_gpus,
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=batch),
            # A model change starts its new replica before the old one stops (the in-tree autoscaler adds
            # the GPU node it needs), so an update never leaves the app with no replica serving.
            max_surge_percent=25,
        )
    )
    # device="cuda" so a replica placed without a GPU fails loudly instead of crawling on CPU.
    return AppConfig(
        engine=EngineConfig(device="cuda"),
        batching=BatchingConfig(max_batch_size=batch, batch_wait_timeout_s=wait_s),
        deployment=deployment,
    )


def _profiles() -> dict[str, AppConfig]:
    return {
        # One GPU per replica; Serve autoscaling adds replicas and KubeRay's autoscaler adds GPU pods for them.
        "gpu": _gpu_profile(1.0, 8, 0.02, None),
        # The seed's packing: two replicas share one GPU at batch 4 (no waiting for a batch to fill) ...
        "gpu-half": _gpu_profile(0.5, 4, 0.0, 2).model_copy(update={"name": "llm-half"}),
        # ... and four replicas share one GPU, each batching dynamically up to 8 requests.
        "gpu-quarter": _gpu_profile(0.25, 8, 0.02, 4).model_copy(update={"name": "llm-quarter"}),
        # The second version of k8s/components/rollout/: the same app under its own name, so its metrics
        # stay apart.
        "gpu-v2": _gpu_profile(1.0, 8, 0.02, None).model_copy(update={"name": "llm-v2"}),
        # The same model through vLLM (Ray Serve LLM) on one GPU per replica; vLLM batches continuously
        # up to max_num_seqs, so Serve scales on a deeper per-replica queue than the transformers engine's.
        "vllm-gpu": AppConfig(
            name="llm-vllm",
            engine=EngineConfig(backend="vllm", model_source=VLLM_MODEL, device="cuda"),
            deployment=DeploymentConfig(
                num_gpus=1.0,
                autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=32),
            ),
        ),
        # The embedded SmolLM2 on CPU pods (kind/minikube): float32 since CPU bf16 quality is unchecked.
        "cpu": AppConfig(
            engine=EngineConfig(device="cpu", dtype="float32", torch_threads=2),
            batching=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.02),
            deployment=DeploymentConfig(num_replicas=1, num_cpus=2),
        ),
    }


PROFILE_NAMES = tuple(_profiles())


def profile(name: str) -> AppConfig:
    """The named `AppConfig` used for the committed manifests (a fresh copy)."""
    try:
        return AppConfig.from_args(_profiles()[name].model_dump(mode="json"))
    except KeyError:
        raise ManifestError(f"unknown profile {name!r}; known: {', '.join(PROFILE_NAMES)}") from None
