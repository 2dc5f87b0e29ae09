"""The transformers model and its batched decode step: left padding, per-row sampling, finished
rows leaving the KV cache, batches merging and the cache trimmed to what live rows attend to. The KV
cache is written in place (`kv_cache.SlabLayer`), so a step's copying does not grow with the width.
With a prefix cache (`prefix_cache.PrefixCache`), a prefill computes only what follows each prompt's
longest cached prefix."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine.detokenizer import OutputText
from llmserve_nb.engine.kv_cache import SlabLayer, to_slabs
from llmserve_nb.engine.loading import cpu_threads, load_gguf_with_cache, pick_device_dtype, resolve_source
from llmserve_nb.engine.prefix_cache import PrefixCache, prefix_cache_for
from llmserve_nb.engine.prompts import Prompts
from llmserve_nb.engine.protocol import GenerationRequest, GenerationResult

__all__ = ["HFEngine", "Row", "DecodeBatch"]

log = logging.getLogger(__name__)

# Sampling at a temperature this low is greedy decoding: dividing logits by it overflows to inf (a
# fuzzer's temperature=4e-249 once turned into NaN probabilities and a 500).
GREEDY_BELOW = 1e-4


@dataclass
class Row:
    """One running request: its output, sampler and where its text and result go."""

    out: OutputText
    prompt: list[int]
    generator: Any
    emit: Callable[[str], Any]
    finish: Callable[[GenerationResult], Any]
    fail: Callable[[BaseException], Any]
    request_id: str = ""


@dataclass
class DecodeBatch:
    """A running batch: rows, their KV cache, attention mask (left padding) and next positions."""

    rows: list[Row]
    cache: Any
    attn: Any
    pos: Any
    next_ids: Any

    @property
    def width(self) -> int:
        return int(self.attn.shape[1])


class HFEngine:
    """A transformers causal LM with a hand-rolled decode loop (per-row sampling, streaming, early exit).

    `generate` runs one static batch (offline use); `TransformersEngine` drives `prefill`/`step`/`merge`
    from its scheduler thread for the server."""

    def __init__(self, cfg: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.model_name
        self.load_timings: dict = {}
        t0 = time.perf_counter()
        self.num_threads = cpu_threads(cfg)
        torch.set_num_threads(self.num_threads)
        self.device, self.dtype = pick_device_dtype(cfg)

        source, gguf_file = resolve_source(cfg)
        preloaded = None
        if gguf_file:
            source, preloaded = load_gguf_with_cache(cfg, source, gguf_file, self.load_timings)
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
        self.tokenizer_source = str(source)  # what a front end loads the same tokenizer from (`core_client`)
        if getattr(model, "hf_device_map", None) is None:
            model = model.to(self.device)
        self.model = model.eval()
        self.cpu_linear = self._pack_cpu_linears() if self.device == "cpu" else "n/a (GPU)"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.max_model_len = min(cfg.max_model_len, getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.prompts = Prompts(self.tokenizer, self.model_name, self.max_model_len, eos_ids)
        self.prefix_cache: PrefixCache | None = prefix_cache_for(cfg)
        self.load_timings["total_load_s"] = time.perf_counter() - t0
        self.load_timings.update(device=self.device, dtype=str(self.dtype).removeprefix("torch."),
                                 torch_threads=self.num_threads, cpu_linear=self.cpu_linear)
        log.info("loaded %s on %s/%s in %.1fs", self.model_name, self.device, self.dtype, self.load_timings["total_load_s"])

    def _pack_cpu_linears(self) -> str:
        """`cfg.cpu_linear` applied: what the model's Linear layers run on, and why when it is not oneDNN."""
        if self.cfg.cpu_linear == "torch":
            return "torch"
        from llmserve_nb.engine.cpu_linear import pack_linears

        t0 = time.perf_counter()
        packed, why_not = pack_linears(self.model)
        if why_not:
            log.warning("Linear layers stay on torch's nn.Linear: %s", why_not)
            return f"torch ({why_not})"
        self.load_timings["cpu_linear_pack_s"] = time.perf_counter() - t0
        return f"onednn ({packed} layers)"

    # ---- prompts (`Prompts`; what the tests and benchmarks call on the engine) -------------------
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        return self.prompts.prompt_ids(req)

    def count_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    def new_output(self, req: GenerationRequest, prompt_tokens: int) -> OutputText:
        return self.prompts.new_output(req, prompt_tokens)

    # ---- offline ----------------------------------------------------------------------------
    def generate(
        self, requests: list[GenerationRequest], on_token: Callable[[int, str], None] | None = None
    ) -> list[GenerationResult]:
        """Run the requests as one static batch (offline use; the server uses `TransformersEngine`).
        `on_token(i, delta)` streams text of request i."""
        import torch

        if not requests:
            return []
        results: list[GenerationResult | None] = [None] * len(requests)
        errors: list[BaseException] = []
        rows = []
        for i, r in enumerate(requests):
            ids = self.prompt_ids(r)
            rows.append(Row(
                self.new_output(r, len(ids)), ids, self.generator(r),
                emit=(lambda d, i=i: on_token(i, d)) if on_token else (lambda d: None),
                finish=lambda res, i=i: results.__setitem__(i, res),
                fail=errors.append,
            ))
        with torch.inference_mode():
            batch = self.prefill(rows)
            while batch.rows:
                self.step(batch)
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    # ---- the decode loop's building blocks -------------------------------------------------
    def _forward(self, input_ids, attn, position_ids, cache):
        return self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,  # the prefill needs only the last position's logits, not width x vocab
        )

    def prefill(self, rows: list[Row]) -> DecodeBatch:
        """Left-padded forward pass over the prompts; samples each row's first token.

        With a prefix cache, rows are grouped by how many of their first tokens are cached; a group's
        cached KV is its past and only the rest of each prompt is computed (one forward per group, the
        groups then merged as running batches merge). Every row's new full blocks are then cached."""
        import torch

        cache = self.prefix_cache
        if cache is None:
            batch, logits = self._prefill_group(rows, 0, [])
            self._absorb(batch, logits)
            return batch
        groups: dict[int, tuple[list[Row], list]] = {}
        for row in rows:
            hit, blocks = cache.lookup(row.prompt)
            members, pasts = groups.setdefault(hit, ([], []))
            members.append(row)
            pasts.append(blocks)
        parts = [(hit, *self._prefill_group(members, hit, pasts)) for hit, (members, pasts) in groups.items()]
        if not self.can_merge(parts[0][1]):
            # Only plain full-attention caches can be stored, joined and trimmed: the first prefill of a
            # model with other layers (sliding windows...) turns prefix caching off, before any hit.
            log.warning("prefix caching is off: %s's KV cache layers are not plain full attention", self.model_name)
            self.prefix_cache = None
            self._absorb(parts[0][1], parts[0][2])
            return parts[0][1]
        for hit, part, _ in parts:
            self._store_prefixes(cache, part, hit)
        batch = parts[0][1]
        for _, part, _ in parts[1:]:
            batch = self.merge(batch, part)
        self._absorb(batch, torch.cat([logits for _, _, logits in parts]))
        return batch

    def _prefill_group(self, rows: list[Row], hit: int, pasts: list) -> tuple[DecodeBatch, Any]:
        """One forward pass over rows whose first `hit` tokens are cached (`pasts`: each row's blocks):
        their KV goes in as the past, the rest of each prompt left-padded after it. A row's mask is then
        [cached prefix, padding, rest]; positions count only unmasked columns, as left padding does."""
        import torch

        width = max(len(r.prompt) for r in rows) - hit
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width + hit - len(r.prompt)) + r.prompt[hit:] for r in rows],
                                 device=self.device)
        attn = torch.tensor([[1] * hit + [0] * (width + hit - len(r.prompt)) + [1] * (len(r.prompt) - hit)
                             for r in rows], device=self.device)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[:, hit:]
        past = None
        if hit:
            from transformers import DynamicCache

            past = DynamicCache(ddp_cache_data=self._past(pasts))
        out = self._forward(input_ids, attn, position_ids, past)
        to_slabs(out.cache)
        # next_ids is set by _absorb; zeros hold its place so groups can be merged before sampling.
        zeros = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        return DecodeBatch(rows, out.cache, attn, position_ids[:, -1:], zeros), out.logits[:, -1, :]

    @staticmethod
    def _past(pasts: list) -> list[tuple[Any, Any]]:
        """Per layer, (keys, values) of the rows' cached prefixes, [rows, kv_heads, hit, head_dim]. Rows
        reusing the same blocks (one system prompt) share one concatenation."""
        import torch

        joined: dict[tuple[int, ...], list] = {}
        per_row = []
        for blocks in pasts:
            key = tuple(map(id, blocks))
            if key not in joined:
                joined[key] = [torch.cat([b[layer] for b in blocks], dim=2) for layer in range(len(blocks[0]))]
            per_row.append(joined[key])
        stacked = [torch.stack([kv[layer] for kv in per_row]) for layer in range(len(per_row[0]))]
        return [(kv[:, 0], kv[:, 1]) for kv in stacked]

    @staticmethod
    def _store_prefixes(cache: PrefixCache, part: DecodeBatch, hit: int) -> None:
        """Cache the full prompt blocks a just-prefilled group computed. Prompt position j of a row is
        column j below `hit` (the past) and column width - len(prompt) + j from there on."""
        import torch

        width = part.width
        for i, row in enumerate(part.rows):
            base = width - len(row.prompt)

            def kv_of(start: int, end: int, i=i, base=base):
                if start >= hit:  # the usual case: only blocks this forward computed are new
                    at = slice(base + start, base + end)
                    return [(layer.keys[i, :, at], layer.values[i, :, at]) for layer in part.cache.layers]
                # Blocks of the past evicted since the lookup (a budget full of this admission's prompts).
                cols = torch.tensor([j if j < hit else base + j for j in range(start, end)], device=part.attn.device)
                return [(layer.keys[i].index_select(1, cols), layer.values[i].index_select(1, cols))
                        for layer in part.cache.layers]

            cache.store(row.prompt, kv_of)

    def step(self, batch: DecodeBatch) -> None:
        """One decode step for every running row."""
        import torch

        batch.attn = torch.cat([batch.attn, batch.attn.new_ones((len(batch.rows), 1))], dim=1)
        batch.pos = batch.pos + 1
        out = self._forward(batch.next_ids[:, None], batch.attn, batch.pos, batch.cache)
        batch.cache = out.cache
        self._absorb(batch, out.logits[:, -1, :])

    def _absorb(self, batch: DecodeBatch, logits) -> None:
        """Sample, stream and finish rows. A row whose sampling or detokenization fails is failed alone."""
        rows = batch.rows
        next_ids, sample_errors = self._sample(logits.float(), [r.out.request for r in rows],
                                               [r.generator for r in rows])
        batch.next_ids = next_ids
        leaving: list[int] = []
        # One conversion per step: indexing the tensor per row costs more than the row's detokenization.
        for i, (row, token) in enumerate(zip(rows, next_ids.tolist())):
            try:
                if i in sample_errors:
                    raise sample_errors[i]
                delta = row.out.push(token)
                if delta:
                    row.emit(delta)
                if row.out.done:
                    row.finish(row.out.result())
                    leaving.append(i)
            except Exception as e:
                log.exception("request %s failed", row.request_id)
                row.fail(e)
                leaving.append(i)
        if leaving:
            self.drop(batch, leaving)

    def drop(self, batch: DecodeBatch, positions: list[int]) -> None:
        """Remove rows from the batch and its KV cache, then trim columns no remaining row attends to.
        In a slab cache the last rows move into the holes (rows change order; only movers are copied)."""
        import torch

        gone = set(positions)
        keep = [i for i in range(len(batch.rows)) if i not in gone]
        if not keep:
            batch.rows = []
            return
        if self.can_merge(batch):
            n = len(keep)
            holes = [i for i in sorted(gone) if i < n]
            movers = [i for i in keep if i >= n]
            order = list(range(n))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
            for layer in batch.cache.layers:
                layer.move_rows(holes, movers, n)
        else:
            order = keep
            batch.cache.batch_select_indices(torch.tensor(keep, device=batch.attn.device))
        idx = torch.tensor(order, device=batch.attn.device)
        batch.rows = [batch.rows[i] for i in order]
        batch.attn, batch.pos, batch.next_ids = batch.attn[idx], batch.pos[idx], batch.next_ids[idx]
        self.trim(batch)

    def can_merge(self, batch: DecodeBatch) -> bool:
        """Only slab caches (plain dynamic KV layers, converted after prefill) can be joined and trimmed;
        other cache types (sliding windows...) run one admission group at a time."""
        return all(isinstance(layer, SlabLayer) for layer in getattr(batch.cache, "layers", [None]))

    def trim(self, batch: DecodeBatch) -> None:
        """Drop leading KV columns that no row attends to: left padding left behind by finished rows.
        Afterwards the width is the longest live row (prompt + generated), exactly."""
        if not self.can_merge(batch):
            return
        live = batch.attn.any(dim=0)
        first = int(live.int().argmax())
        if first == 0:
            return
        batch.attn = batch.attn[:, first:]
        for layer in batch.cache.layers:
            layer.trim_left(first)

    def merge(self, a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
        """Join two running batches: the newcomers' KV rows go below the running ones, both right-aligned
        to the wider of the two; the narrower side's mask is left-padded."""
        import torch
        import torch.nn.functional as F

        ta, tb = a.width, b.width
        width = max(ta, tb)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.append_rows(lb, width)
        a.attn = torch.cat([F.pad(a.attn, (width - ta, 0)), F.pad(b.attn, (width - tb, 0))])
        a.pos = torch.cat([a.pos, b.pos])
        a.next_ids = torch.cat([a.next_ids, b.next_ids])
        a.rows = a.rows + b.rows
        self.trim(a)  # finishes trim in drop(); a merge is the only other way the width changes
        return a

    def generator(self, req: GenerationRequest):
        import torch

        if req.temperature < GREEDY_BELOW or req.seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(req.seed)
        return g

    @staticmethod
    def _sample(logits, reqs: list[GenerationRequest], generators) -> tuple[Any, dict[int, Exception]]:
        """Next token per row; errors are per row (e.g. probabilities that are not finite).

        Greedy rows take one argmax over the batch; sampled rows share one softmax and top-p cut with
        per-row temperature and top_p, and the unseeded ones one multinomial. A seeded row draws
        from its own generator, so its text depends only on its seed."""
        import torch

        greedy = logits.argmax(-1)
        sampled = [j for j, r in enumerate(reqs) if r.temperature >= GREEDY_BELOW]
        if not sampled:
            return greedy, {}
        out = greedy.clone()
        probs = _probabilities(logits[sampled], [reqs[j] for j in sampled])
        errors: dict[int, Exception] = {}
        unseeded = [k for k, j in enumerate(sampled) if generators[j] is None]
        if unseeded:
            try:
                out[[sampled[k] for k in unseeded]] = torch.multinomial(probs[unseeded], 1)[:, 0]
            except RuntimeError:  # a row whose probabilities are not finite: each alone, to blame only it
                for k in unseeded:
                    try:
                        out[sampled[k]] = torch.multinomial(probs[k], 1)[0]
                    except RuntimeError as e:
                        errors[sampled[k]] = e
        for k, j in enumerate(sampled):
            if generators[j] is not None:
                try:
                    out[j] = torch.multinomial(probs[k], 1, generator=generators[j])[0]
                except RuntimeError as e:
                    errors[j] = e
        return out, errors


def _probabilities(logits, reqs: list[GenerationRequest]):
    """Each row's sampling distribution: softmax at its temperature, then its top-p cut (the smallest
    prefix of the sorted probabilities whose mass reaches top_p, always at least the top token)."""
    import torch

    temperature = torch.tensor([r.temperature for r in reqs], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if all(r.top_p >= 1.0 for r in reqs):
        return probs
    # top_p 1 keeps everything: a cumulative sum that rounds up to 1 before the tail must not cut it.
    top_p = torch.tensor([r.top_p if r.top_p < 1.0 else float("inf") for r in reqs], dtype=logits.dtype,
                         device=logits.device)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    cut = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
    cut[:, 0] = False  # a top_p that rounds to 0 in float32 (fuzzer: 5e-324) still keeps one
    sorted_p[cut] = 0
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)
