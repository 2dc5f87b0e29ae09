"""The engine in an engine-core process (`EngineConfig(engine_core="process")`): the same protocol and the
same text as the decode thread, stop strings and aborts across the pipe, live reconfiguration, stats
without a round trip, and a core that dies (killed, faulted, closed, or orphaned) detected and isolated."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import EngineCoreClient, EngineDeadError, create_engine
from llmserve_nb.engine import GenerationRequest as Req

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def core():
    """One engine core for the module (each start loads the model in a new process)."""
    e = create_engine(EngineConfig(engine_core="process"))
    yield e
    e.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


async def _start(engine, reqs):
    return engine.submit([await engine.prepare(r) for r in reqs])


def _until(what, check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.01)
    return value


def _fails(call) -> bool:
    try:
        call()
    except EngineDeadError:
        return True
    return False


def _idle(engine) -> dict:
    """The stats once the core's last step has said that nothing runs or waits there."""
    return _until("the core going idle", lambda: (s := engine.stats())["kv_cache_width"] == 0
                  and not s["num_requests_running"] and not s["num_requests_waiting"] and s)


def test_the_core_is_a_process_of_its_own_and_says_so(core):
    info = core.info()
    assert isinstance(core, EngineCoreClient)
    assert info["engine_core"] == "process" and info["engine_core_pid"] == core.proc.pid != os.getpid()
    assert psutil.Process(core.proc.pid).ppid() == os.getpid()
    assert info["model"] == core.model_name and info["total_load_s"] > 0 and info["torch_threads"] >= 1
    core.check_health()


def test_greedy_text_is_the_decode_threads_for_a_mixed_batch_with_a_stop_string(core, engine):
    """The core samples the ids; the front end makes the text and ends a row at a stop string the core
    cannot see, then aborts it there. Text, token counts and finish reasons match the in-process engine."""
    reqs = [Req(messages=FRANCE, max_tokens=24), Req(prompt="Once upon a time", max_tokens=20, ignore_eos=True),
            Req(prompt="1, 2, 3, 4,", max_tokens=40, stop=[" 9"]), Req(prompt="def fibonacci(n):", max_tokens=12)]
    alone = [engine.generate([r])[0] for r in reqs]
    aborted_before = core.stats()["aborted"]

    async def go():
        return [await s.collect() for s in await _start(core, reqs)]

    results = run(go())
    assert [r.text for r in results] == [a.text for a in alone]
    assert [(r.completion_tokens, r.finish_reason) for r in results] == \
        [(a.completion_tokens, a.finish_reason) for a in alone]
    assert results[2].finish_reason == "stop" and " 9" not in results[2].text and "8," in results[2].text
    # The stop-string row left the core's batch through an abort, not by running on to its max_tokens.
    stats = _idle(core)
    assert stats["aborted"] == aborted_before + 1


def test_an_abort_ends_a_running_request_within_a_step_and_an_early_one_at_submit(core):
    async def go():
        [stream] = await _start(core, [Req(prompt="Tell me a long story", max_tokens=400, ignore_eos=True)])
        async for out in stream:
            if out.text:
                core.abort(stream.request_id)
                break
        running = await stream.collect()
        prepared = await core.prepare(Req(prompt="never runs", max_tokens=50, ignore_eos=True))
        core.abort(prepared.request_id)  # the client left before its request was submitted
        [early] = core.submit([prepared])
        return running, await early.collect()

    running, early = run(go())
    assert running.finish_reason == "abort" and running.completion_tokens < 40
    assert (early.finish_reason, early.completion_tokens) == ("abort", 0)
    _idle(core)


def test_configure_reaches_the_core_and_limits_what_decodes_at_once(core):
    """At max_num_seqs=1 the second request's first token comes after the first request's end; at the
    default they are prefilled together and its text comes first."""

    async def order(limit: int) -> list[str]:
        core.configure(max_num_seqs=limit)
        assert core.stats()["max_num_seqs"] == limit
        events: list[str] = []

        async def consume(name, stream):
            async for out in stream:
                if out.text and f"{name} text" not in events:
                    events.append(f"{name} text")
            events.append(f"{name} end")

        # Two admission groups: a group is admitted whole, whatever the limit.
        streams = [(await _start(core, [Req(prompt=p, max_tokens=16, ignore_eos=True)]))[0] for p in ("One", "Two")]
        await asyncio.gather(*(consume(n, s) for n, s in zip(("first", "second"), streams)))
        return events

    default = EngineConfig().max_num_seqs
    try:
        one_at_a_time = run(order(1))
        together = run(order(default))
    finally:
        core.configure(max_num_seqs=default)
    assert one_at_a_time.index("first end") < one_at_a_time.index("second text"), one_at_a_time
    assert together.index("second text") < together.index("first end"), together
    with pytest.raises(ValueError, match="max_num_seqs"):
        core.configure(max_num_seqs=0)
    assert _idle(core)["max_num_seqs"] == default


def test_stats_come_from_the_cores_steps_with_the_prefix_cache(core):
    system = [{"role": "system", "content": "You are a terse assistant. " * 8}]

    async def go():
        for question in ("Name a colour.", "Name a fruit."):
            await (await _start(core, [Req(messages=system + [{"role": "user", "content": question}],
                                           max_tokens=4)]))[0].collect()

    before = _idle(core)
    run(go())
    stats = _idle(core)
    assert stats["decode_steps"] > before["decode_steps"]
    assert stats["prefix_cache"]["enabled"]
    assert stats["prefix_cache"]["hit_tokens"] - before["prefix_cache"]["hit_tokens"] >= 48  # the system prompt


def _end_mid_stream(engine, end, error: str) -> None:
    """A long request; `end()` at its first output; its stream must then fail with EngineDeadError(`error`)."""

    async def go():
        [stream] = await _start(engine, [Req(prompt="Tell me a long story", max_tokens=400, ignore_eos=True)])
        async for _ in stream:
            end()
            break
        with pytest.raises(EngineDeadError, match=error):
            await stream.collect()

    run(go())


def test_a_killed_core_fails_requests_in_flight_health_and_new_requests_with_why():
    engine = create_engine(EngineConfig(engine_core="process"))
    try:
        _end_mid_stream(engine, lambda: os.kill(engine.proc.pid, signal.SIGKILL), "killed by signal 9")
        with pytest.raises(EngineDeadError, match="killed by signal 9"):
            run(engine.prepare(Req(prompt="hello")))
        with pytest.raises(EngineDeadError, match="killed by signal 9"):
            engine.check_health()
        with pytest.raises(EngineDeadError):
            engine.submit([])
    finally:
        engine.close()


def test_a_fault_in_the_cores_loop_fails_its_requests_and_close_ends_the_process():
    engine = create_engine(EngineConfig(engine_core="process"))
    try:
        _end_mid_stream(engine, lambda: engine.inject_fault("fault injection: test"), "fault injection: test")
        _until("the health check failing", lambda: _fails(engine.check_health))
        with pytest.raises(EngineDeadError, match="decode loop died.*fault injection"):
            engine.check_health()
    finally:
        engine.close()
    assert engine.proc.returncode == 0  # it left on the close message, not killed
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_close_fails_requests_in_flight_and_refuses_new_ones(core):
    _end_mid_stream(core, core.close, "closed")
    assert core.proc.returncode == 0
    with pytest.raises(EngineDeadError, match="closed"):
        core.check_health()
    with pytest.raises(EngineDeadError, match="closed"):
        core.submit([])


def test_a_model_that_cannot_load_fails_the_constructor_with_why_and_leaves_no_core(tmp_path):
    # The front end's tokenizer or the core's model, whichever fails first, names what could not be loaded.
    with pytest.raises((OSError, RuntimeError), match="no-such-model"):
        create_engine(EngineConfig(engine_core="process", model_source=str(tmp_path / "no-such-model")))
    assert not [p for p in psutil.Process().children() if "llmserve_nb.engine.core" in " ".join(p.cmdline())]


def test_the_front_ends_tokenizer_is_transformers_own_without_torch():
    """The front end reads the tokenizer's files itself (`FileTokenizer`) so that it imports neither
    transformers' tokenizer classes nor torch; prompts, chat templates and ids must be AutoTokenizer's."""
    from transformers import AutoTokenizer

    from llmserve_nb.engine.loading import ready_source
    from llmserve_nb.engine.prompts import FileTokenizer, load_tokenizer

    source = ready_source(EngineConfig())
    assert source is not None  # the session's engine fixture has converted the embedded model
    mine, theirs = load_tokenizer(source), AutoTokenizer.from_pretrained(source)
    assert isinstance(mine, FileTokenizer)
    chats = [FRANCE, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi ünïcode 🤖"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "again\n\n"}]]
    for chat in chats:
        text = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert mine.apply_chat_template(chat, add_generation_prompt=True) == text
        assert mine(text, add_special_tokens=False) == {"input_ids": theirs(text, add_special_tokens=False)["input_ids"]}
    for prompt in ["Once upon a time", " leading space", "日本語\n\nnewlines", "<|im_start|>user", "a" * 3000]:
        assert mine(prompt)["input_ids"] == theirs(prompt)["input_ids"]
    script = (f"import sys; from llmserve_nb.engine.prompts import load_tokenizer; t = load_tokenizer({source!r}); "
              "t.apply_chat_template([{'role': 'user', 'content': 'x'}], add_generation_prompt=True); "
              "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True
                          ).stdout.strip() == "False"


def test_the_core_exits_when_its_replica_dies():
    """A replica killed outright (SIGKILL: no close, no finalizer) must not leave its core holding a model
    and cores: the core sees its front end's pipe close and exits."""
    script = ("from llmserve_nb.config import EngineConfig; from llmserve_nb.engine import create_engine; "
              "import sys; e = create_engine(EngineConfig(engine_core='process')); "
              "print(e.proc.pid, flush=True); sys.stdin.read()")
    replica = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        core_pid = int(replica.stdout.readline())
        core = psutil.Process(core_pid)
        assert core.ppid() == replica.pid
        replica.kill()
        replica.wait(30)
        core.wait(30)  # raises TimeoutExpired if the core outlives its replica
    finally:
        replica.kill()
