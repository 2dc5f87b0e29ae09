"""llmserve_nb: serve LLMs with Ray Serve on KubeRay, from notebooks.

The public surface is small on purpose: a typed config, `connect()` to a cluster, the handle that
`Cluster.deploy()` returns, and the notebook helpers. Sub-modules (`engine`, `serve_app`, `k8s`,
`kuberay`, `bench`) hold the rest and are imported lazily where heavy.
"""
from llmserve_nb.cluster import AppHandle, Cluster, ClusterError, DeployError, connect
from llmserve_nb.config import (
    AppConfig,
    AutoscalingConfig,
    BatchingConfig,
    ConfigError,
    DeploymentConfig,
    EngineConfig,
)
from llmserve_nb.notebooks import emit_results, plot_batch_sizes, read_results

__all__ = [
    "AppConfig",
    "AppHandle",
    "AutoscalingConfig",
    "BatchingConfig",
    "Cluster",
    "ClusterError",
    "ConfigError",
    "DeployError",
    "DeploymentConfig",
    "EngineConfig",
    "connect",
    "emit_results",
    "plot_batch_sizes",
    "read_results",
]
