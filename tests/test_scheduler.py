"""Continuous batching through the engine protocol (prepare → submit → stream, abort, health) on the
embedded SmolLM2-135M: per-request completion, a bounded KV cache, aborts, failure isolation."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from llmserve_nb.engine import EngineDeadError, TransformersEngine
from llmserve_nb.engine import GenerationRequest as Req

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served(engine):
    """The protocol engine over the session's loaded model (a fresh scheduler thread per test)."""
    return TransformersEngine(engine.cfg, model=engine)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def _start(served, reqs):
    prepared = [await served.prepare(r) for r in reqs]
    return prepared, served.submit(prepared)


def test_a_request_ends_when_it_is_done_not_when_its_admission_peers_are(served):
    """Regression: one future per admission group made an 8-token request wait for a 200-token peer."""

    async def go():
        _, (short, long) = await _start(served, [Req(prompt="Hi", max_tokens=8, ignore_eos=True),
                                                  Req(prompt="Tell me a long story", max_tokens=160, ignore_eos=True)])
        await short.collect()
        steps_at_short_end = served.stats()["decode_steps"]
        long_running = not long.finished
        await long.collect()
        return short.result, long.result, steps_at_short_end, long_running

    short, long, steps, long_running = run(go())
    assert short.completion_tokens == 8 and long.completion_tokens == 160
    assert long_running and steps < 40  # the short one ended ~8 steps in, long before its peer


def test_joining_a_running_batch_gives_the_same_greedy_text(served, engine):
    reqs = [Req(messages=FRANCE, max_tokens=24), Req(prompt="Once upon a time", max_tokens=20),
            Req(messages=[{"role": "user", "content": "Write a poem about the sea and the sky."}], max_tokens=30),
            Req(prompt="def fibonacci(n):", max_tokens=12)]
    alone = [engine.generate([r])[0].text for r in reqs]

    async def go():
        _, first = await _start(served, reqs[:2])
        while served.stats()["decode_steps"] < 3:  # the first group is decoding when the second arrives
            await asyncio.sleep(0.01)
        _, second = await _start(served, reqs[2:])
        return [(await s.collect()).text for s in first + second]

    assert run(go()) == alone
    assert served.stats()["running_max"] == 4  # the groups really ran together


def test_kv_cache_width_stays_bounded_under_sustained_mixed_load(served):
    """Regression: finished rows left their columns behind and merges padded up to the current width, so
    under steady traffic the cache only grew. Now its width never exceeds the longest request
    (prompt + output), however long the load lasts; on the old code it grew with every step."""
    rng = random.Random(0)
    reqs = [Req(prompt=" ".join(["word"] * rng.randint(2, 12)), max_tokens=rng.randint(4, 40), ignore_eos=True)
            for _ in range(36)]

    async def go():
        longest = 0
        pending = list(reqs)
        in_flight: set[asyncio.Task] = set()
        while pending or in_flight:
            while pending and len(in_flight) < 6:  # keep the batch busy: it never empties
                p = await served.prepare(pending.pop())
                longest = max(longest, len(p.prompt_ids) + p.request.max_tokens)
                in_flight.add(asyncio.ensure_future(served.submit([p])[0].collect()))
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        return longest

    longest = run(go())
    stats = served.stats()
    assert stats["decode_steps"] > 2 * longest  # long enough that an untrimmed cache would outgrow it
    assert 0 < stats["kv_cache_width_max"] <= longest
    assert stats["kv_cache_width"] == 0 and stats["num_requests_running"] == 0


def test_abort_stops_a_running_request_within_a_step_and_a_waiting_one_at_once(served):
    async def go():
        p, (st,) = await _start(served, [Req(prompt="Tell me a story", max_tokens=400, ignore_eos=True)])
        n = 0
        async for _ in st:
            n += 1
            if n == 3:
                served.abort(p[0].request_id)
                steps = served.stats()["decode_steps"]
        after = served.stats()["decode_steps"]
        return st.result, steps, after

    result, steps_at_abort, steps_after = run(go())
    assert result.finish_reason == "abort" and result.completion_tokens < 10
    assert steps_after - steps_at_abort <= 2
    time.sleep(0.3)
    assert served.stats()["decode_steps"] == steps_after  # nothing decodes for nobody
    assert served.stats()["aborted"] == 1
    served.abort("no-such-request")  # unknown ids are ignored
    assert served.stats()["num_requests_running"] == 0


def test_tokenization_runs_off_the_event_loop(served, monkeypatch):
    """Regression: tokenization and the chat template ran on the replica's event loop, stalling every
    other request (streams, health checks) while a long prompt was tokenized."""
    real = served.model.prompt_ids

    def slow(req):
        time.sleep(0.6)  # a very long prompt
        return real(req)

    monkeypatch.setattr(served.model, "prompt_ids", slow)

    async def go():
        gaps = []

        async def ticker():
            last = time.perf_counter()
            for _ in range(20):
                await asyncio.sleep(0.02)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        await asyncio.gather(ticker(), served.prepare(Req(prompt="hello", max_tokens=4)))
        return max(gaps)

    assert run(go()) < 0.3


def test_a_failed_prefill_fails_only_its_admission_group(served, monkeypatch):
    """Regression: one bad request failed every request in flight. Groups admitted in the same iteration
    are prefilled together; when that fails, each group is retried alone."""
    real = served.model.prefill

    def prefill(rows):
        if any(r.out.request.prompt == "POISON" for r in rows):
            raise RuntimeError("simulated bad input")
        return real(rows)

    monkeypatch.setattr(served.model, "prefill", prefill)

    async def go():
        _, running = await _start(served, [Req(prompt="Tell me a story", max_tokens=30, ignore_eos=True)])
        while served.stats()["decode_steps"] < 2:
            await asyncio.sleep(0.01)
        prepared = [await served.prepare(Req(prompt=t, max_tokens=6, ignore_eos=True)) for t in ("One", "POISON")]
        good = served.submit(prepared[:1])
        bad = served.submit(prepared[1:])  # a separate admission group, likely taken in the same iteration
        outcome = []
        for s in running + good + bad:
            try:
                outcome.append((await s.collect()).completion_tokens)
            except RuntimeError as e:
                outcome.append(str(e))
        return outcome

    assert run(go()) == [30, 6, "simulated bad input"]


def test_a_failed_sampling_fails_only_its_row_and_a_failed_step_only_its_rows(served, monkeypatch):
    real_sample = served.model._sample

    def sample(logits, reqs, generators):
        out, errors = real_sample(logits, reqs, generators)
        for j, r in enumerate(reqs):
            if r.seed == 13:
                errors[j] = RuntimeError("probability tensor contains inf")
        return out, errors

    monkeypatch.setattr(served.model, "_sample", staticmethod(sample))

    async def go():
        _, streams = await _start(served, [Req(prompt="A", max_tokens=8, ignore_eos=True),
                                           Req(prompt="B", max_tokens=8, seed=13, temperature=1.0, ignore_eos=True)])
        a = await streams[0].collect()
        with pytest.raises(RuntimeError, match="contains inf"):
            await streams[1].collect()
        return a

    assert run(go()).completion_tokens == 8

    real_forward = served.model._forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step, not the prefill
            raise RuntimeError("simulated device error")
        return real_forward(*a, **k)

    monkeypatch.setattr(served.model, "_forward", flaky)

    async def again():
        _, (s,) = await _start(served, [Req(prompt="Hello", max_tokens=8, ignore_eos=True)])
        with pytest.raises(RuntimeError, match="simulated device error"):
            await s.collect()
        _, (ok,) = await _start(served, [Req(messages=FRANCE, max_tokens=16)])
        return await ok.collect()

    assert "Paris" in run(again()).text  # the loop kept serving


def test_a_dead_decode_loop_fails_the_health_check_and_new_requests_fast(served, monkeypatch):
    def boom():
        raise SystemExit("simulated crash of the scheduler itself")

    async def go():
        monkeypatch.setattr(served.batcher, "_take", boom)
        _, (s,) = await _start(served, [Req(prompt="Hi", max_tokens=4)])
        with pytest.raises(EngineDeadError):
            await s.collect()
        with pytest.raises(EngineDeadError):
            served.check_health()
        with pytest.raises(EngineDeadError):
            served.submit([await served.prepare(Req(prompt="Hi", max_tokens=4))])

    # The thread is parked in _take's wait; wake it so it runs the patched method on its next round.
    run(go())
    served.batcher._thread.join(timeout=30)
    assert not served.batcher._thread.is_alive()


def test_empty_prompt_is_refused_at_prepare(served):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(served.prepare(Req(prompt="", max_tokens=4)))
