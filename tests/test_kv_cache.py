"""The in-place KV cache (`SlabLayer`): the same keys and values as transformers' concatenating cache
under every operation the scheduler performs, a decode step that writes in place, and greedy answers
unchanged when rows join, finish out of order and move."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from llmserve_nb.engine import GenerationRequest as Req
from llmserve_nb.engine import TransformersEngine
from llmserve_nb.engine.kv_cache import SlabLayer

HEADS, DIM = 3, 4


def _kv(rows: int, width: int) -> torch.Tensor:
    return torch.randn(rows, HEADS, width, DIM)


def test_a_slab_matches_a_concatenating_cache_under_random_scheduler_operations():
    """Reference: plain tensors updated the way DynamicLayer does (cat, index, slice, pad). Hundreds of
    random steps, trims, drops and merges cross every reallocation boundary of rows and columns."""
    rng = random.Random(0)
    ref_k, ref_v = _kv(3, 5), _kv(3, 5)
    slab = SlabLayer(ref_k.clone(), ref_v.clone())
    for _ in range(600):
        op = rng.choice(["step"] * 6 + ["trim", "drop", "merge"])
        rows, width = ref_k.shape[0], ref_k.shape[2]
        if op == "step":
            k, v = _kv(rows, 1), _kv(rows, 1)
            ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
            out_k, out_v = slab.update(k, v)
            assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        elif op == "trim" and width > 1:
            n = rng.randint(1, width - 1)
            ref_k, ref_v = ref_k[:, :, n:], ref_v[:, :, n:]
            slab.trim_left(n)
        elif op == "drop" and rows > 1:
            gone = set(rng.sample(range(rows), rng.randint(1, rows - 1)))
            keep = [i for i in range(rows) if i not in gone]
            n = len(keep)
            holes, movers = [i for i in sorted(gone) if i < n], [i for i in keep if i >= n]
            order = list(range(n))
            for h, m in zip(holes, movers):
                order[h] = m
            assert sorted(order) == keep
            ref_k, ref_v = ref_k[order], ref_v[order]
            slab.move_rows(holes, movers, n)
        elif op == "merge":
            theirs = rng.randint(1, 40)
            added = rng.randint(1, 6)
            new_k, new_v = _kv(added, theirs), _kv(added, theirs)
            other = SlabLayer(new_k.clone(), new_v.clone())
            common = max(width, theirs)
            slab.append_rows(other, common)
            pad = lambda t, w: torch.nn.functional.pad(t, (0, 0, common - w, 0))  # noqa: E731
            # Left of a row's own history the slab holds stale (masked) values; compare only real columns.
            got_k = slab.keys
            assert torch.equal(got_k[:rows, :, common - width:], ref_k)
            assert torch.equal(got_k[rows:, :, common - theirs:], new_k)
            ref_k = torch.cat([pad(ref_k, width), pad(new_k, theirs)])
            ref_v = torch.cat([pad(ref_v, width), pad(new_v, theirs)])
            ref_k[:rows, :, : common - width] = got_k[:rows, :, : common - width]
            ref_k[rows:, :, : common - theirs] = got_k[rows:, :, : common - theirs]
            ref_v[:rows, :, : common - width] = slab.values[:rows, :, : common - width]
            ref_v[rows:, :, : common - theirs] = slab.values[rows:, :, : common - theirs]
        assert torch.equal(slab.keys, ref_k) and torch.equal(slab.values, ref_v)
        assert slab.get_seq_length() == ref_k.shape[2]
        assert torch.isfinite(slab._k).all()  # stale columns are masked, and must never be NaN


def test_a_decode_step_writes_the_cache_in_place(engine):
    """Regression: transformers' DynamicLayer concatenated every step, copying the whole cache of every
    layer, so a step's cost grew with the batch's width (half a step at width 476). A slab keeps its
    buffer across steps; only running out of room reallocates it."""
    from llmserve_nb.engine.hf import Row

    reqs = [Req(prompt="Tell me a story about a lighthouse", max_tokens=40, ignore_eos=True),
            Req(prompt="Hi", max_tokens=40, ignore_eos=True)]
    rows = [Row(engine.new_output(r, len(ids)), ids, None, emit=lambda d: None, finish=lambda r: None,
                fail=pytest.fail) for r, ids in ((r, engine.prompt_ids(r)) for r in reqs)]
    with torch.inference_mode():
        batch = engine.prefill(rows)
        layer = batch.cache.layers[0]
        assert isinstance(layer, SlabLayer)
        reallocations = 0
        for _ in range(30):
            before = layer._k.data_ptr()
            engine.step(batch)
            assert layer.keys.data_ptr() != 0 and layer.keys.shape[2] == batch.width
            if layer._k.data_ptr() != before:
                reallocations += 1
    assert reallocations <= 2, f"{reallocations} reallocations in 30 steps: the step is copying the cache"


def test_greedy_answers_are_unchanged_when_rows_join_finish_out_of_order_and_move(engine):
    """Requests of random lengths arrive while others decode; rows finishing mid-batch are filled by the
    last rows (which change places), and the batch is trimmed and merged over and over. Each answer
    must equal that request decoded alone."""
    rng = random.Random(1)
    prompts = ["Once upon a time", "def fibonacci(n):", "The capital of France is", "Hi",
               "Write a poem about the sea and the sky.", "List three colours:", "Why is the sky blue?",
               "import numpy as np", "Dear diary, today", "The quick brown fox"]
    reqs = [Req(prompt=p, max_tokens=rng.randint(3, 30), ignore_eos=True) for p in prompts]
    alone = [engine.generate([r])[0].text for r in reqs]
    served = TransformersEngine(engine.cfg, model=engine)

    async def go():
        streams = []
        for r in reqs:
            streams += served.submit([await served.prepare(r)])
            steps = served.stats()["decode_steps"]
            while served.stats()["decode_steps"] < steps + rng.randint(0, 3):
                await asyncio.sleep(0.005)
        return [(await s.collect()).text for s in streams]

    try:
        assert asyncio.run(asyncio.wait_for(go(), 300)) == alone
        assert served.stats()["running_max"] >= 4
    finally:
        served.close()
