"""Prefix caching: the block LRU on its own (fast, no model), then the engine on the embedded SmolLM2-135M
with caching on against off: identical greedy text on a mixed batch, hits, aborts, failures, metrics."""
from __future__ import annotations

import asyncio

import pytest
import torch

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest as Req
from llmserve_nb.engine import TransformersEngine
from llmserve_nb.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes, prefix_cache_for

LAYERS, HEADS, DIM = 2, 1, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * BLOCK_TOKENS * DIM * 4  # fp32


def fake_kv(ids):
    """kv_of for a fake 2-layer model whose KV at position j is the token id there (so a wrong block shows)."""
    def kv_of(start, end):
        t = torch.tensor(ids[start:end], dtype=torch.float32)[None, :, None].expand(HEADS, -1, DIM)
        return [(t + layer, t - layer) for layer in range(LAYERS)]
    return kv_of


def stored(cache: PrefixCache, ids) -> None:
    cache.store(ids, fake_kv(ids))


# ---- the cache alone ---------------------------------------------------------------------------

def test_block_hashes_name_whole_prefixes():
    a = list(range(40))
    b = list(range(32)) + [99] * 8
    c = [7] + list(range(1, 40))
    assert len(block_hashes(a)) == 2  # the 8 tokens past the last full block are never cached
    assert block_hashes(a)[:2] == block_hashes(b)[:2]
    # The same second block after a different first one is a different prefix: the hash is chained.
    assert block_hashes(c)[1] != block_hashes(a)[1]


def test_lookup_finds_the_longest_cached_prefix_and_leaves_a_token_to_compute():
    cache = PrefixCache(1 << 20)
    ids = list(range(100, 164))  # exactly 4 blocks
    stored(cache, ids)
    assert cache.stats()["blocks"] == 4 and cache.stats()["bytes"] == 4 * BLOCK_BYTES
    hit, blocks = cache.lookup(ids)
    assert hit == 48 and len(blocks) == 3  # the whole prompt is cached, but its last token must be computed
    assert all(torch.equal(b[0][0, 0, :, 0], torch.tensor(ids[i * 16:(i + 1) * 16], dtype=torch.float32))
               for i, b in enumerate(blocks))
    hit, _ = cache.lookup(ids[:40] + [1] * 30)
    assert hit == 32
    hit, blocks = cache.lookup([5] + ids[1:])
    assert (hit, blocks) == (0, [])
    stats = cache.stats()
    assert (stats["queries"], stats["hits"]) == (3, 2)
    assert (stats["queried_tokens"], stats["hit_tokens"]) == (64 + 70 + 64, 48 + 32)


def test_lru_eviction_keeps_bytes_within_the_budget_and_evicts_tails_first():
    cache = PrefixCache(5 * BLOCK_BYTES)
    first = list(range(48))  # 3 blocks
    stored(cache, first)
    second = list(range(1000, 1048))  # 3 more: one block must go
    stored(cache, second)
    stats = cache.stats()
    assert stats["bytes"] == 5 * BLOCK_BYTES <= stats["budget_bytes"] and stats["evictions"] == 1
    # The older prompt lost its last block, not its first: its head still hits.
    assert cache.lookup(first + [0])[0] == 32
    assert cache.lookup(second + [0])[0] == 48
    for n in range(20):  # many prompts: bytes never exceed the budget
        stored(cache, [n * 100 + i for i in range(16 * (1 + n % 4))])
        assert cache.stats()["bytes"] <= cache.budget_bytes
    # A prompt larger than the budget keeps its first blocks, as many as fit.
    big = list(range(5000, 5000 + 16 * 8))
    assert cache.store(big, fake_kv(big)) == 5 and cache.lookup(big)[0] == 5 * 16


def test_a_budget_smaller_than_a_block_stores_nothing():
    cache = PrefixCache(BLOCK_BYTES - 1)
    assert cache.store(list(range(32)), fake_kv(list(range(32)))) == 0
    assert cache.stats()["bytes"] == 0


def test_the_config_turns_the_cache_off_with_the_flag_or_a_zero_budget():
    assert prefix_cache_for(EngineConfig(prefix_caching=False)) is None
    assert prefix_cache_for(EngineConfig(prefix_cache_mb=0)) is None
    assert prefix_cache_for(EngineConfig(prefix_cache_mb=1.5)).budget_bytes == 3 << 19
    with pytest.raises(ValueError):
        EngineConfig(prefix_cache_mb=-1)


# ---- the engine --------------------------------------------------------------------------------

SYSTEM = ("You are a meticulous assistant for a small seaside bookshop. Answer briefly, in plain English, "
          "and never invent titles. The shop opens at nine, closes at six, and is closed on Mondays. ") * 2


def chat(*turns: str, max_tokens: int = 20) -> Req:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return Req(messages=messages, max_tokens=max_tokens)


# Some share the system prompt, one also a whole earlier turn (a longer hit), some share nothing;
# different lengths, so hit groups, miss groups and padding all meet in one admission.
FIRST = [chat("When do you open?"), Req(prompt="Once upon a time", max_tokens=12),
         chat("Do you sell maps?", max_tokens=26)]
SECOND = [chat("When do you open?", "We open at nine.", "And on Mondays?"), chat("Are you open on Sunday?"),
          Req(prompt="def fibonacci(n):", max_tokens=16), chat("Do you sell maps?", max_tokens=26)]


@pytest.fixture
def cached(engine, monkeypatch):
    """The session's model with a fresh prefix cache, behind a fresh scheduler."""
    monkeypatch.setattr(engine, "prefix_cache", PrefixCache(64 << 20))
    served = TransformersEngine(engine.cfg, model=engine)
    yield served
    served.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def _collect(streams):
    return [(await s.collect()).text for s in streams]


async def _submit(served, reqs):
    return served.submit([await served.prepare(r) for r in reqs])


def _alone_without_cache(engine, reqs, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(engine, "prefix_cache", None)
        return [engine.generate([r])[0].text for r in reqs]


def test_greedy_text_is_identical_with_caching_on_a_mixed_batch_joining_a_running_one(engine, cached, monkeypatch):
    """The required check: caching changes no token. The first admission is cold (it fills the cache);
    the second arrives while the first decodes, with rows that hit the system prompt, one that hits a
    whole earlier turn, and rows that miss, so cached rows are prefilled and merged into a running batch."""
    want = _alone_without_cache(engine, FIRST + SECOND, monkeypatch)
    cold = [block_hashes(engine.prompt_ids(r)) for r in FIRST]
    hits = [_expected_hit(engine.prompt_ids(r), cold) for r in SECOND]
    assert hits[0] > hits[1] > 0 and hits[2] == 0  # a whole earlier turn, the system prompt, nothing shared

    async def go():
        first = await _submit(cached, FIRST)
        while cached.stats()["decode_steps"] < 3:
            await asyncio.sleep(0.01)
        second = await _submit(cached, SECOND)
        return await _collect(first + second)

    assert run(go()) == want
    stats = cached.stats()
    assert stats["running_max"] == 7  # the second group really joined the running one
    prefix = stats["prefix_cache"]
    assert (prefix["queries"], prefix["hits"], prefix["hit_tokens"]) == (7, 3, sum(hits))
    assert 0 < prefix["bytes"] <= prefix["budget_bytes"]
    # Every request once more, all at once and now all cached: still the same text.
    assert run(_collect_all(cached, FIRST + SECOND)) == want


def _expected_hit(ids, cached_chains) -> int:
    """What a lookup of `ids` should reuse: its longest run of leading blocks some cached prompt shares,
    leaving its last token to compute."""
    mine = block_hashes(ids)[: (len(ids) - 1) // BLOCK_TOKENS]
    best = 0
    for chain in cached_chains:
        n = 0
        while n < min(len(mine), len(chain)) and mine[n] == chain[n]:
            n += 1
        best = max(best, n)
    return best * BLOCK_TOKENS


async def _collect_all(served, reqs):
    return await _collect(await _submit(served, reqs))


def test_offline_generate_with_caching_equals_without(engine, monkeypatch):
    reqs = FIRST + SECOND
    want = _alone_without_cache(engine, reqs, monkeypatch)
    monkeypatch.setattr(engine, "prefix_cache", PrefixCache(64 << 20))
    assert [r.text for r in engine.generate(reqs)] == want  # cold: rows sharing a prefix all compute it
    assert [r.text for r in engine.generate(reqs)] == want  # warm
    assert engine.prefix_cache.stats()["hits"] == 5  # all but the two prompts shorter than a block


def test_a_budget_that_evicts_within_one_admission_changes_no_token(engine, monkeypatch):
    """A budget of a few blocks: storing a long unrelated prompt evicts blocks that rows of the same
    admission were prefilled from, so those rows store their prefix again from their own past."""
    unrelated = Req(prompt=" ".join(["lighthouse keeper"] * 60), max_tokens=8)
    reqs = [unrelated, SECOND[0], SECOND[1], SECOND[3]]
    want = _alone_without_cache(engine, FIRST + reqs, monkeypatch)
    block_bytes = 720 << 10  # SmolLM2-135M in fp32: 30 layers x 2 x 3 heads x 16 x 64 x 4 bytes
    monkeypatch.setattr(engine, "prefix_cache", PrefixCache(8 * block_bytes))
    assert [r.text for r in engine.generate(FIRST)] == want[:3]
    assert [r.text for r in engine.generate(reqs)] == want[3:]
    stats = engine.prefix_cache.stats()
    assert stats["hits"] == 3 and stats["evictions"] > 0 and stats["bytes"] <= stats["budget_bytes"]
    _consistent(engine.prefix_cache)
    assert [r.text for r in engine.generate(reqs)] == want[3:]


def _snapshot(cache: PrefixCache) -> dict:
    return {h: [t.clone() for t in b.kv] for h, b in cache._blocks.items()}


def _consistent(cache: PrefixCache) -> None:
    stats = cache.stats()
    assert stats["bytes"] == sum(b.nbytes for b in cache._blocks.values()) <= stats["budget_bytes"]
    assert stats["blocks"] == len(cache._blocks)


def test_aborting_a_row_that_used_the_cache_leaves_the_cache_intact(engine, cached, monkeypatch):
    (want,) = _alone_without_cache(engine, [chat("Do you sell maps?", max_tokens=26)], monkeypatch)
    run(_collect_all(cached, [chat("When do you open?")]))  # caches the system prompt
    before = _snapshot(engine.prefix_cache)

    async def go():
        prepared = await cached.prepare(chat("Tell me about every book you have.", max_tokens=300))
        (stream,) = cached.submit([prepared])
        async for _ in stream:
            if cached.stats()["decode_steps"] >= 3:
                cached.abort(prepared.request_id)
        return stream.result

    result = run(go())
    assert result.finish_reason == "abort"
    assert engine.prefix_cache.stats()["hits"] == 1
    _consistent(engine.prefix_cache)
    # The cached KV was the aborted row's past: decoding into it must not have written into the cache.
    after = _snapshot(engine.prefix_cache)
    assert all(all(torch.equal(a, b) for a, b in zip(before[h], after[h])) for h in before)
    assert run(_collect_all(cached, [chat("Do you sell maps?", max_tokens=26)])) == [want]
    assert engine.prefix_cache.stats()["hits"] == 2


def test_a_failed_prefill_with_cache_hits_fails_only_its_group_and_the_cache_stays_usable(cached, engine, monkeypatch):
    run(_collect_all(cached, [chat("When do you open?")]))
    real = engine._forward

    def forward(input_ids, attn, position_ids, cache):
        if cache is not None and input_ids.shape[1] > 1 and any(9999 == t for t in input_ids.flatten().tolist()):
            raise RuntimeError("simulated bad input")
        return real(input_ids, attn, position_ids, cache)

    monkeypatch.setattr(engine, "_forward", forward)
    blocks = engine.prefix_cache.stats()["blocks"]

    async def go():
        good, bad = await cached.prepare(chat("Do you sell maps?")), await cached.prepare(chat("Poison"))
        bad.prompt_ids = bad.prompt_ids[:-2] + [9999] + bad.prompt_ids[-1:]
        streams = cached.submit([good]) + cached.submit([bad])
        outcome = []
        for s in streams:
            try:
                outcome.append((await s.collect()).finish_reason)
            except RuntimeError as e:
                outcome.append(str(e))
        return outcome

    good, bad = run(go())
    assert good in ("stop", "length") and bad == "simulated bad input"
    _consistent(engine.prefix_cache)
    assert engine.prefix_cache.stats()["blocks"] >= blocks
    cached.check_health()


def test_stats_report_the_cache_and_say_when_it_is_off(engine, monkeypatch):
    monkeypatch.setattr(engine, "prefix_cache", None)
    served = TransformersEngine(engine.cfg, model=engine)
    try:
        assert served.stats()["prefix_cache"] == {"enabled": False}
    finally:
        served.close()


def test_server_metrics_export_the_cache_totals_as_increments():
    from llmserve_nb.server.metrics import ServerMetrics

    engine: dict = {"num_requests_running": 0}  # e.g. the vLLM backend: no prefix cache reported
    m = ServerMetrics("tiny", engine_stats=lambda: engine)
    added: dict[str, int] = {}
    for key, counter in m._prefix_counters.items():
        counter.inc = lambda n, key=key: added.__setitem__(key, added.get(key, 0) + n)
    gauges: dict[str, float] = {}
    for key, gauge in m._prefix_gauges.items():
        gauge.set = lambda v, key=key: gauges.__setitem__(key, v)
    m.request("/v1/completions")
    assert added == {} and gauges == {}
    engine["prefix_cache"] = {"enabled": True, "queried_tokens": 100, "hit_tokens": 64, "evictions": 0,
                              "bytes": 10, "budget_bytes": 50, "blocks": 1}
    m.request("/v1/completions")
    engine["prefix_cache"] = dict(engine["prefix_cache"], queried_tokens=300, evictions=2, bytes=40)
    m.request("/v1/completions")
    assert added == {"queried_tokens": 300, "hit_tokens": 64, "evictions": 2}  # totals, never counted twice
    assert gauges == {"bytes": 40.0, "budget_bytes": 50.0, "blocks": 1.0}
