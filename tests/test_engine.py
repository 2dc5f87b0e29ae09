"""The transformers engine on the embedded SmolLM2-135M: answers, batching invariance, streaming, sampling."""
from __future__ import annotations

import pytest

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest as Req
from llmserve_nb.engine import load_engine

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Chat and raw prompts of different lengths, finishing at different steps.
MIXED = [
    Req(messages=FRANCE, max_tokens=24),
    Req(prompt="Once upon a time", max_tokens=20),
    Req(messages=[{"role": "user", "content": "Write a poem about the sea and the sky."}], max_tokens=30),
    Req(prompt="def fibonacci(n):", max_tokens=12),
]


def test_greedy_answer_mentions_paris(engine):
    (r,) = engine.generate([Req(messages=FRANCE, max_tokens=32)])
    assert "Paris" in r.text
    assert r.finish_reason == "stop" and 0 < r.completion_tokens < 32
    assert r.prompt_tokens == engine.count_tokens(Req(messages=FRANCE))


def test_batched_greedy_equals_unbatched(engine):
    reqs = MIXED
    batched = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.completion_tokens for b in batched] == [a.completion_tokens for a in alone]
    # Different lengths in one batch: rows that finish early leave it, the rest carry on.
    assert len({b.completion_tokens for b in batched}) > 1


def test_streamed_text_equals_returned_text(engine):
    parts: dict[int, list[str]] = {0: [], 1: []}
    reqs = [Req(messages=FRANCE, max_tokens=24), Req(prompt="The weather today is", max_tokens=16)]
    results = engine.generate(reqs, on_token=lambda i, d: parts[i].append(d))
    for i, r in enumerate(results):
        assert "".join(parts[i]) == r.text
        assert len(parts[i]) > 3  # it really streamed, token by token


def test_stop_strings_truncate_and_never_leak_into_the_stream(engine):
    parts: list[str] = []
    (r,) = engine.generate([Req(messages=FRANCE, max_tokens=32, stop=["Paris"])], on_token=lambda i, d: parts.append(d))
    assert r.finish_reason == "stop"
    assert "Paris" not in r.text and r.text.startswith("The capital of France is")
    assert "".join(parts) == r.text


def test_ignore_eos_generates_exactly_max_tokens(engine):
    (r,) = engine.generate([Req(messages=FRANCE, max_tokens=40, ignore_eos=True)])
    assert r.completion_tokens == 40 and r.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(engine):
    req = dict(prompt="My favourite animal is", max_tokens=24, temperature=1.0, top_p=0.95)
    a = engine.generate([Req(seed=7, **req)])[0].text
    b = engine.generate([Req(seed=7, **req)])[0].text
    c = engine.generate([Req(seed=8, **req)])[0].text
    assert a == b
    assert a != c


def test_context_length_is_enforced(engine):
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.generate([Req(prompt="hello " * 10, max_tokens=engine.max_model_len)])


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=3.0), dict(top_p=0.0)])
def test_bad_sampling_parameters(bad):
    with pytest.raises(ValueError):
        Req(prompt="x", **bad)


def test_gguf_conversion_cache_gives_identical_output(tmp_path):
    """First load dequantises the GGUF and writes safetensors; the second load reads them back."""
    cfg = EngineConfig(cache_dir=str(tmp_path))
    first = load_engine(cfg)
    second = load_engine(cfg)
    assert first.load_timings["cache"] == "miss" and second.load_timings["cache"] == "hit"
    assert list(tmp_path.glob("models/*/model.safetensors"))
    req = [Req(messages=FRANCE, max_tokens=16)]
    assert first.generate(req)[0].text == second.generate(req)[0].text


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        load_engine(EngineConfig(model_source=str(tmp_path / "no-such-model")))


# ---- GPU paths, covered on CPU as far as they go --------------------------------------------

def test_auto_dtype_picks_bf16_or_fp16_on_gpu_and_fp32_on_cpu(monkeypatch):
    import torch

    from llmserve_nb.engine import _pick_device_dtype

    assert _pick_device_dtype(EngineConfig()) == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _pick_device_dtype(EngineConfig()) == ("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _pick_device_dtype(EngineConfig()) == ("cuda", torch.float16)  # e.g. T4, V100
    assert _pick_device_dtype(EngineConfig(device="cpu", dtype="bfloat16")) == ("cpu", torch.bfloat16)


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        load_engine(EngineConfig(device="cuda"))


def test_bf16_weights_still_answer_correctly():
    """The half-precision path a GPU takes by default, run on CPU: same loading code, sane output."""
    e = load_engine(EngineConfig(dtype="bfloat16"))
    assert str(e.dtype) == "torch.bfloat16" and next(e.model.parameters()).dtype == e.dtype
    (r,) = e.generate([Req(messages=FRANCE, max_tokens=24)])
    assert "Paris" in r.text


# ---- continuous batching ----------------------------------------------------------------------

def test_requests_joining_a_running_batch_get_the_same_greedy_text(engine):
    import time

    from llmserve_nb.engine import ContinuousBatcher

    reqs = MIXED
    alone = [engine.generate([r])[0].text for r in reqs]
    batcher = ContinuousBatcher(engine, max_num_seqs=8)
    streamed: dict[int, list[str]] = {}
    first = batcher.submit(reqs[:2])
    time.sleep(0.3)  # the first group is decoding when the second arrives, with a different prompt width
    second = batcher.submit(reqs[2:], on_token=lambda i, d: streamed.setdefault(i, []).append(d))
    texts = [r.text for r in first.result(timeout=300) + second.result(timeout=300)]
    assert texts == alone
    assert "".join(streamed[0]) == texts[2]
    assert batcher.running_max > 2  # the groups really ran together


def test_continuous_batcher_rejects_bad_input_up_front_and_survives_a_failed_step(engine, monkeypatch):
    from llmserve_nb.engine import ContinuousBatcher

    batcher = ContinuousBatcher(engine)
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        batcher.submit([Req(prompt="word " * 3000, max_tokens=8)])
    real = engine._forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real(*a, **k)

    monkeypatch.setattr(engine, "_forward", flaky)
    with pytest.raises(RuntimeError, match="simulated device error"):
        batcher.submit([Req(prompt="Hello", max_tokens=4)]).result(timeout=60)
    (ok,) = batcher.submit([Req(messages=FRANCE, max_tokens=16)]).result(timeout=120)
    assert "Paris" in ok.text
