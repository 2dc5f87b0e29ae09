"""The generation engine.

`protocol.Engine` is all the server may use: prepare → submit → an async stream of outputs, `abort`,
`configure`, `check_health`, `stats`, `info`, `inject_fault`, `close`; `create_engine` makes one from
an `EngineConfig`. `TransformersEngine` implements it with `HFEngine` (the transformers model and
its decode step) and `ContinuousBatcher` (the scheduler thread) in the replica's process;
`EngineCoreClient` with the two in an engine-core process (`core`), the replica keeping the tokenizer
(`prompts`) and the streams; `loading` finds, converts and
places the model; `cpu_linear` runs its Linear layers on oneDNN on CPU; `detokenizer` turns ids into
streamable text.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmserve_nb.engine.loading import embedded_model_path, local_model_dir, pick_device_dtype
from llmserve_nb.engine.protocol import (
    Engine,
    EngineDeadError,
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    RequestOutput,
    RequestStream,
)
from llmserve_nb.config import EngineConfig

if TYPE_CHECKING:
    from llmserve_nb.engine.hf import HFEngine

# The model side imports torch and transformers (seconds of CPU): Serve's build task imports the app only
# to build it, never to run a model, so these load on first use, in the replica.
_MODEL_SIDE = {"HFEngine": "llmserve_nb.engine.hf", "ContinuousBatcher": "llmserve_nb.engine.scheduler",
               "TransformersEngine": "llmserve_nb.engine.scheduler", "EngineCoreClient": "llmserve_nb.engine.core_client"}


def __getattr__(name: str) -> Any:
    if name in _MODEL_SIDE:
        return getattr(importlib.import_module(_MODEL_SIDE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ContinuousBatcher",
    "Engine",
    "EngineCoreClient",
    "EngineDeadError",
    "GenerationRequest",
    "GenerationResult",
    "HFEngine",
    "PreparedRequest",
    "RequestOutput",
    "RequestStream",
    "TransformersEngine",
    "create_engine",
    "embedded_model_path",
    "load_engine",
    "local_model_dir",
    "pick_device_dtype",
]


# Where the transformers engine decodes (`EngineConfig.engine_core`): the module and class that run it.
_ENGINE_CORES = {"thread": ("llmserve_nb.engine.scheduler", "TransformersEngine"),
                 "process": ("llmserve_nb.engine.core_client", "EngineCoreClient")}


def create_engine(cfg: EngineConfig) -> Engine:
    """The serving engine `cfg` describes, loaded and running (what a replica serves)."""
    module, name = _ENGINE_CORES[cfg.engine_core]
    return getattr(importlib.import_module(module), name)(cfg)


def load_engine(cfg: EngineConfig | None = None) -> HFEngine:
    """Load the transformers model for offline use (`HFEngine.generate`, one static batch). The server's
    engine comes from `create_engine`."""
    from llmserve_nb.engine.hf import HFEngine

    return HFEngine(cfg or EngineConfig())
