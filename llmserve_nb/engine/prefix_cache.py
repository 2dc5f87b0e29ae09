"""Automatic prefix caching: the KV of prompt prefixes the engine has already computed, reused.

Chat traffic repeats the same system prompt and history; recomputing their keys and values is most
of a long prompt's prefill. As in vLLM's automatic prefix caching, a prompt is cut into blocks of
`BLOCK_TOKENS` tokens and each full block is named by a hash chained over its parent's hash and its
own tokens, so a block's name stands for the whole prefix that ends with it. A block holds that
prefix's keys and values for its positions, per layer. Blocks live in one LRU within a budget in
bytes; the least recently used are evicted first. A chain is touched from its last block to its
first, so under pressure a prefix loses its tail before its head: a head evicted first would leave
its descendants unreachable, holding memory that can never hit.

Lookups and stores come from the engine's one model thread; `stats()` may be read from any thread.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llmserve_nb.config import EngineConfig

__all__ = ["BLOCK_TOKENS", "PrefixCache", "block_hashes", "prefix_cache_for"]

BLOCK_TOKENS = 16
_ROOT = 0x5EED  # the parent hash of a prompt's first block


def block_hashes(ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """The chained hash of each full block of `ids`: equal for two prompts exactly as far as they share
    their first blocks. Deterministic across processes (Python hashes ints and tuples of ints without
    a per-process seed), so a router can compute the same names."""
    out, parent = [], _ROOT
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(ids[start : start + block_tokens])))
        out.append(parent)
    return out


def prefix_cache_for(cfg: EngineConfig) -> PrefixCache | None:
    """The prefix cache `cfg` asks for: None when `prefix_caching` is off or the budget is 0."""
    budget = int(cfg.prefix_cache_mb * 2**20) if cfg.prefix_caching else 0
    return PrefixCache(budget) if budget > 0 else None


@dataclass
class _Block:
    parent: int
    tokens: tuple[int, ...]
    kv: tuple[Any, ...]  # per layer, keys and values stacked: [2, kv_heads, BLOCK_TOKENS, head_dim]
    nbytes: int


class PrefixCache:
    """Block-hashed prefix KV in an LRU bounded by `budget_bytes` (see the module docstring)."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if budget_bytes <= 0:
            raise ValueError(f"a prefix cache needs a positive budget, got {budget_bytes} bytes")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.bytes = 0
        self.queries = 0  # prompts looked up
        self.hits = 0  # prompts that reused at least one block
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.stored_blocks = 0
        self.evictions = 0

    # ---- the model thread ----------------------------------------------------------------------
    def lookup(self, ids: Sequence[int]) -> tuple[int, list[tuple[Any, ...]]]:
        """The longest cached block-aligned prefix of `ids` that leaves at least one token to compute
        (its logits are the first output): (its length in tokens, its blocks' per-layer KV)."""
        usable = (len(ids) - 1) // self.block_tokens
        chain = block_hashes(ids[: usable * self.block_tokens], self.block_tokens)
        found: list[int] = []
        with self._lock:
            parent = _ROOT
            for i, h in enumerate(chain):
                block = self._blocks.get(h)
                start = i * self.block_tokens
                # The tokens and parent are compared too: a hash collision reads as a miss, never wrong KV.
                tokens = tuple(ids[start : start + self.block_tokens])
                if block is None or block.parent != parent or block.tokens != tokens:
                    break
                found.append(h)
                parent = h
            self._touch(found)
            self.queries += 1
            self.queried_tokens += len(ids)
            self.hit_tokens += len(found) * self.block_tokens
            self.hits += bool(found)
            return len(found) * self.block_tokens, [self._blocks[h].kv for h in found]

    def store(self, ids: Sequence[int], kv_of: Callable[[int, int], Sequence[tuple[Any, Any]]]) -> int:
        """Cache the full blocks of `ids` not cached yet. `kv_of(start, end)` gives, per layer, the keys
        and the values ([kv_heads, end - start, head_dim], views will do) of those prompt positions; it
        is called at most once, for the missing range. Returns how many blocks were added."""
        import torch

        chain = block_hashes(ids, self.block_tokens)
        with self._lock:
            first = 0
            while first < len(chain) and chain[first] in self._blocks:
                first += 1
            self._touch(chain[:first])
            if first == len(chain):
                return 0
        kv = kv_of(first * self.block_tokens, len(chain) * self.block_tokens)
        b = self.block_tokens
        new = []
        for i in range(first, len(chain)):
            # The one copy: a block owns its storage, and nothing it was read from can write into it later.
            at = slice((i - first) * b, (i - first + 1) * b)
            block_kv = tuple(torch.stack((keys[:, at], values[:, at])) for keys, values in kv)
            nbytes = sum(t.numel() * t.element_size() for t in block_kv)
            parent = chain[i - 1] if i else _ROOT
            new.append((chain[i], _Block(parent, tuple(ids[i * b : (i + 1) * b]), block_kv, nbytes)))
        with self._lock:
            # The chain's cached head is most recent, so evicting for its tail never takes its own blocks:
            # only as much of the tail is added as fits with the head in the budget.
            kept = sum(self._blocks[h].nbytes for h in chain[:first])
            fits = 0
            for _, block in new:
                if kept + block.nbytes > self.budget_bytes:
                    break
                kept += block.nbytes
                fits += 1
            new = new[:fits]
            need = sum(block.nbytes for _, block in new)
            while self._blocks and self.bytes + need > self.budget_bytes:
                _, old = self._blocks.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            for h, block in new:
                self._blocks[h] = block
                self.bytes += block.nbytes
            self.stored_blocks += len(new)
            self._touch(chain[: first + len(new)])
            return len(new)

    def _touch(self, chain: list[int]) -> None:
        for h in reversed(chain):  # the head ends most recent: tails are evicted before heads
            self._blocks.move_to_end(h)

    # ---- any thread ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": True,
                "block_tokens": self.block_tokens,
                "blocks": len(self._blocks),
                "bytes": self.bytes,
                "budget_bytes": self.budget_bytes,
                "usage_perc": round(self.bytes / self.budget_bytes, 6),
                "queries": self.queries,
                "hits": self.hits,
                "queried_tokens": self.queried_tokens,
                "hit_tokens": self.hit_tokens,
                "hit_rate": round(self.hit_tokens / self.queried_tokens, 6) if self.queried_tokens else 0.0,
                "stored_blocks": self.stored_blocks,
                "evictions": self.evictions,
            }
