"""Continuous batching through the engine protocol (prepare → submit → stream, abort, health) on the
embedded SmolLM2-135M: per-request completion, a bounded KV cache, aborts, failure isolation."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from llmserve_nb.engine import EngineDeadError, TransformersEngine
from llmserve_nb.engine import GenerationRequest as Req

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def served(engine):
    """The protocol engine over the session's loaded model (a fresh scheduler thread per test)."""
    e = TransformersEngine(engine.cfg, model=engine)
    yield e
    e.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def _start(served, reqs):
    prepared = [await served.prepare(r) for r in reqs]
    return prepared, served.submit(prepared)


def _idle(served, timeout_s: float = 30.0) -> dict:
    """The engine's stats once nothing runs or waits. A stream ends as its last row leaves the batch, so
    the scheduler's own bookkeeping may trail the consumer by a moment."""
    deadline = time.monotonic() + timeout_s
    while (stats := served.stats())["num_requests_running"] or stats["num_requests_waiting"]:
        assert time.monotonic() < deadline, f"the engine did not go idle: {stats}"
        time.sleep(0.01)
    return stats


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
    stats = _idle(served)
    assert stats["decode_steps"] > 2 * longest  # long enough that an untrimmed cache would outgrow it
    assert 0 < stats["kv_cache_width_max"] <= longest
    assert stats["kv_cache_width"] == 0


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
    stats = _idle(served)
    assert stats["decode_steps"] == steps_after and stats["aborted"] == 1  # nothing decodes for nobody


def test_an_abort_that_arrives_before_its_submit_is_honoured_at_submit(served):
    """Regression: the scheduler consumed an abort of a request that was neither waiting nor running, so
    a request aborted between `prepare` and `submit` (its client left while it waited for its
    admission batch) decoded to max_tokens for nobody."""

    async def go():
        _, (busy,) = await _start(served, [Req(prompt="Tell me a story", max_tokens=400, ignore_eos=True)])
        late = await served.prepare(Req(prompt="Hello there", max_tokens=64, ignore_eos=True))
        served.abort(late.request_id)
        # Two more steps: the loop has begun an iteration since the abort, so it has taken it.
        steps = served.stats()["decode_steps"]
        while served.stats()["decode_steps"] < steps + 2:
            await asyncio.sleep(0.01)
        (stream,) = served.submit([late])
        submitted_at = served.stats()["decode_steps"]
        result = await stream.collect()
        finished_at = served.stats()["decode_steps"]
        served.abort(busy.request_id)
        await busy.collect()
        return result, finished_at - submitted_at

    result, steps = run(go())
    assert (result.finish_reason, result.completion_tokens, result.text) == ("abort", 0, "")
    assert steps <= 1


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


def _batcher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "llm-continuous-batcher"}


def test_a_dead_decode_loop_fails_its_requests_the_health_check_and_new_requests_fast(served):
    async def go():
        _, (s,) = await _start(served, [Req(prompt="Tell me a story", max_tokens=400, ignore_eos=True)])
        while served.stats()["decode_steps"] < 2:
            await asyncio.sleep(0.01)
        late = await served.prepare(Req(prompt="Hi", max_tokens=4))
        threads = _batcher_threads()
        served.inject_fault("simulated crash of the scheduler itself")
        with pytest.raises(EngineDeadError, match="decode loop died: RuntimeError.'simulated crash"):
            await s.collect()
        with pytest.raises(EngineDeadError, match="simulated crash"):
            served.check_health()
        with pytest.raises(EngineDeadError, match="simulated crash"):
            served.submit([late])
        with pytest.raises(EngineDeadError, match="simulated crash"):
            await served.prepare(Req(prompt="Hi", max_tokens=4))
        return threads

    threads = run(go())
    served.close()  # joins the loop's thread, which ended with the fault
    assert len(_batcher_threads()) == len(threads) - 1


def test_close_stops_the_loop_fails_requests_in_flight_and_refuses_new_ones(served):
    async def go():
        served.configure(max_num_seqs=1)  # the second admission group waits for the first request
        _, (running,) = await _start(served, [Req(prompt="Tell me a story", max_tokens=400, ignore_eos=True)])
        _, (waiting,) = await _start(served, [Req(prompt="Hi", max_tokens=4)])
        while served.stats()["decode_steps"] < 2:
            await asyncio.sleep(0.01)
        assert (served.stats()["num_requests_running"], served.stats()["num_requests_waiting"]) == (1, 1)
        late = await served.prepare(Req(prompt="Hi", max_tokens=4))
        threads = _batcher_threads()
        served.close()
        assert len(_batcher_threads()) == len(threads) - 1  # the scheduler thread is gone
        for stream in (running, waiting):
            with pytest.raises(EngineDeadError, match="the engine was closed"):
                await stream.collect()
        with pytest.raises(EngineDeadError, match="the engine was closed"):
            served.submit([late])
        with pytest.raises(EngineDeadError, match="the engine was closed"):
            await served.prepare(Req(prompt="Hi", max_tokens=4))

    run(go())
    with pytest.raises(EngineDeadError, match="the engine was closed"):
        served.check_health()
    served.close()  # a second close (Serve's __del__, then the garbage collector's) is harmless


def test_configure_refuses_an_engine_that_runs_nothing(served):
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        served.configure(max_num_seqs=0)


def test_info_says_which_model_and_how_it_was_loaded(served, engine):
    info = served.info()
    assert (info["model"], info["max_model_len"]) == (engine.model_name, engine.max_model_len)
    assert (info["device"], info["torch_threads"]) == ("cpu", engine.num_threads)
    assert info["total_load_s"] == engine.load_timings["total_load_s"]


def test_the_engine_loads_on_the_decode_loops_own_thread_and_a_failed_load_raises(monkeypatch):
    """One OpenMP pool per replica: the model's load (and its oneDNN prepacking) runs on the thread that then
    decodes, not on the constructor's (a second pool made every step 1.4-1.6x slower)."""
    import llmserve_nb.engine.scheduler as scheduler

    class FakeModel:
        model_name, max_model_len = "fake", 64

        def __init__(self, cfg):
            self.loaded_on = threading.current_thread()

    monkeypatch.setattr(scheduler, "HFEngine", FakeModel)
    served = TransformersEngine()
    try:
        assert served.model.loaded_on is served.batcher._thread is not threading.current_thread()
        assert served.batcher.engine is served.model and served.batcher.alive
    finally:
        served.close()

    def broken(cfg):
        raise OSError("no model at /nowhere")

    monkeypatch.setattr(scheduler, "HFEngine", broken)
    with pytest.raises(OSError, match="no model at /nowhere"):
        TransformersEngine()
    with pytest.raises(ValueError, match="either an engine or a function"):
        scheduler.ContinuousBatcher()


def test_empty_prompt_is_refused_at_prepare(served):
    with pytest.raises(ValueError, match="prompt is empty"):
        run(served.prepare(Req(prompt="", max_tokens=4)))


def test_a_step_streams_every_rows_text_in_one_hand_off_and_the_same_text(served, engine):
    """Regression: the engine thread called `call_soon_threadsafe` once per row per token, and each call
    woke the event loop, whose Python then took the GIL from the decode thread. Now a step's text for
    all its rows reaches the loop in one hand-off, and the streams still get token-by-token text that
    adds up to what the engine gives offline."""
    reqs = [Req(prompt=f"Story number {i}:", max_tokens=12 + i, ignore_eos=True) for i in range(8)]
    offline = [r.text for r in engine.generate(reqs)]

    async def go():
        prepared = [await served.prepare(r) for r in reqs]
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        hand_offs = []

        def counting(callback, *args, **kw):
            hand_offs.append(callback)
            return real(callback, *args, **kw)

        loop.call_soon_threadsafe = counting
        try:
            steps = served.stats()["decode_steps"]
            streams = served.submit(prepared)
            chunks = [[] for _ in streams]

            async def consume(i, stream):
                async for out in stream:
                    chunks[i].append(out.text)

            await asyncio.gather(*(consume(i, s) for i, s in enumerate(streams)))
            return streams, chunks, len(hand_offs), served.stats()["decode_steps"] - steps
        finally:
            loop.call_soon_threadsafe = real

    streams, chunks, hand_offs, steps = run(go())
    assert [s.result.text for s in streams] == ["".join(c) for c in chunks] == offline
    assert steps == 12 + 7 - 1  # the prefill samples each row's first token
    assert hand_offs == steps + 1  # the prefill's first tokens, then one per step
    assert all(len(c) > 3 for c in chunks)  # still streamed as it was decoded


def test_an_outbox_hands_each_loop_its_items_at_once_in_order():
    from llmserve_nb.engine.protocol import GenerationResult, RequestStream, StreamOutbox

    class CountingLoop(asyncio.SelectorEventLoop):
        hand_offs = 0

        def call_soon_threadsafe(self, *a, **k):
            self.hand_offs += 1
            return super().call_soon_threadsafe(*a, **k)

    loops = [CountingLoop() for _ in range(3)]
    streams = [RequestStream("a", loops[0]), RequestStream("b", loops[0]), RequestStream("c", loops[1]),
               RequestStream("d", loops[2])]
    loops[2].close()  # its consumer is gone: its items are dropped, the others still delivered
    outbox = StreamOutbox()
    done = GenerationResult("Hello world", 3, 2, "length")
    for s in streams:
        outbox.put(s, "Hello")
    outbox.put(streams[0], " world")
    outbox.put(streams[0], done)
    outbox.put(streams[1], ValueError("bad row"))
    outbox.flush()
    outbox.flush()  # nothing new: no hand-off
    assert [loop.hand_offs for loop in loops[:2]] == [1, 1]

    async def read(stream):
        try:
            return [(out.text, out.result) async for out in stream]
        except ValueError as e:
            return str(e)

    assert loops[0].run_until_complete(read(streams[0])) == [("Hello world", done)]
    assert loops[0].run_until_complete(read(streams[1])) == "bad row"
    outbox.put(streams[2], done)
    outbox.flush()
    assert loops[1].run_until_complete(read(streams[2])) == [("Hello", done)]  # what arrived meanwhile, coalesced
    for loop in loops[:2]:
        loop.close()
