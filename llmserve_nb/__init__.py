"""llmserve_nb: serve LLMs with Ray Serve on KubeRay, from notebooks."""
from llmserve_nb.config import AppConfig, AutoscalingConfig, BatchingConfig, ConfigError, DeploymentConfig, EngineConfig

__all__ = [
    "AppConfig",
    "AutoscalingConfig",
    "BatchingConfig",
    "ConfigError",
    "DeploymentConfig",
    "EngineConfig",
]
