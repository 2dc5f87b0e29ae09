"""llmserve_nb: serve LLMs with Ray Serve on KubeRay, from notebooks.

The public surface is small on purpose: a typed config, `connect()` to a cluster, the handle that
`Cluster.deploy()` returns, and the notebook helpers. The layers below it, each a sub-package: `config`
(the schema, at the bottom), `backends` (an AppConfig rendered as a Serve application, one per engine),
`cluster` (connect, deploy, the app's handle), `server` and `engine` (what runs in a replica), `bench`,
`experiments`, `observability`, `rollout` and `k8s` (what a notebook runs against an app).
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
