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
    with pytest.raises(ValueError, match="exceeds the context length"):
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

    from llmserve_nb.engine import pick_device_dtype as _pick_device_dtype

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


def test_empty_prompt_is_refused_up_front(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([Req(prompt="", max_tokens=4)])


def test_streamed_text_is_the_decode_of_the_ids_without_redecoding(engine, monkeypatch):
    """Incremental detokenization: each token costs O(1) (the full id list is never re-decoded, which made
    a long answer quadratic), and the text is still exactly what a full decode gives, multi-byte
    characters included."""
    calls = {"n": 0}
    real = type(engine.tokenizer).decode

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(type(engine.tokenizer), "decode", counting)
    reqs = [Req(prompt="Les élèves français écrivent: « déjà vu » — café ☕ 😀", max_tokens=48, ignore_eos=True),
            Req(messages=FRANCE, max_tokens=24), Req(prompt="日本語の文章を書いてください。", max_tokens=32, ignore_eos=True)]
    parts: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    results = engine.generate(reqs, on_token=lambda i, d: parts[i].append(d))
    assert calls["n"] == 0
    monkeypatch.undo()
    from llmserve_nb.engine.detokenizer import OutputText

    for i, (req, r) in enumerate(zip(reqs, results)):
        out = OutputText(req, 0, engine.tokenizer, engine.eos_ids)
        streamed = "".join(out.push(t) for t in _token_ids(engine, req, r))
        assert streamed == r.text == "".join(parts[i])
    assert any(ord(c) > 0x7F for c in results[0].text + results[2].text)  # the multi-byte path really ran


def _token_ids(engine, req, result):
    """Re-run one request greedily to get its ids (the public result carries only text and counts)."""
    ids: list[int] = []
    from llmserve_nb.engine.hf import Row

    out = engine.new_output(req, 0)
    real_push = out.push

    def push(t):
        ids.append(t)
        return real_push(t)

    out.push = push  # type: ignore[method-assign]
    import torch

    row = Row(out, engine.prompt_ids(req), None, emit=lambda d: None, finish=lambda r: None, fail=lambda e: None)
    with torch.inference_mode():
        batch = engine.prefill([row])
        while batch.rows:
            engine.step(batch)
    assert out.result().text == result.text
    return ids


def test_full_decode_agrees_with_incremental_text(engine):
    req = Req(prompt="Write about the sea: 🌊 waves, ñandú, straße.", max_tokens=40, ignore_eos=True)
    (r,) = engine.generate([req])
    ids = _token_ids(engine, req, r)
    assert r.text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_split_across_tokens_is_held_back(engine):
    """A stop string that arrives over several tokens never shows its first half in the stream."""
    (full,) = engine.generate([Req(messages=FRANCE, max_tokens=24)])
    stop = full.text[len("The capital of France is "):][:4]  # e.g. "Pari", spans a token boundary or not
    parts: list[str] = []
    (r,) = engine.generate([Req(messages=FRANCE, max_tokens=24, stop=[stop])], on_token=lambda i, d: parts.append(d))
    assert r.finish_reason == "stop" and stop not in "".join(parts) and "".join(parts) == r.text


# ---- threads -----------------------------------------------------------------------------------

def test_torch_threads_default_to_the_machine_outside_ray_and_honour_the_override():
    import os

    from llmserve_nb.engine.loading import cpu_threads

    assert cpu_threads(EngineConfig()) == len(os.sched_getaffinity(0))
    assert cpu_threads(EngineConfig(torch_threads=3)) == 3


def test_a_vanishing_temperature_is_greedy_not_nan(engine):
    """Regression (found by schemathesis): temperature=4e-249 overflowed logits/temperature to inf, the
    probabilities became NaN and the request failed with a 500."""
    req = dict(messages=FRANCE, max_tokens=16)
    (tiny,) = engine.generate([Req(temperature=4.271499502267022e-249, seed=3, **req)])
    (greedy,) = engine.generate([Req(temperature=0.0, **req)])
    assert tiny.text == greedy.text


def test_a_vanishing_top_p_keeps_the_top_token(engine):
    """Regression (schemathesis): top_p=5e-324 is 0 in float32, every token was cut and sampling raised."""
    (r,) = engine.generate([Req(prompt="^\U000d4c12", max_tokens=4, temperature=1.0, top_p=5e-324, seed=1)])
    (greedy,) = engine.generate([Req(prompt="^\U000d4c12", max_tokens=4)])
    assert (r.text, r.completion_tokens) == (greedy.text, greedy.completion_tokens)  # only the top token is left


def test_packed_linears_compute_what_nn_linear_computes():
    """`pack_linears` replaces every nn.Linear, nested or not, with or without bias, and the products agree
    for any leading shape (a decode step's rows, a prefill's rows x positions)."""
    import torch

    from llmserve_nb.engine.cpu_linear import PackedLinear, pack_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(96, 32, bias=False)))
    xs = [torch.randn(1, 64), torch.randn(7, 64), torch.randn(3, 5, 64)]
    with torch.inference_mode():
        want = [model(x) for x in xs]
    assert pack_linears(model) == (2, None)
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    with torch.inference_mode():
        for x, w in zip(xs, want):
            torch.testing.assert_close(model(x), w, rtol=1e-5, atol=1e-5)


def test_pack_linears_leaves_the_model_alone_when_onednn_refuses(monkeypatch):
    import torch

    from llmserve_nb.engine import cpu_linear

    class Refusing(cpu_linear.PackedLinear):
        def __init__(self, linear):
            raise RuntimeError("mkldnn_reorder_linear_weight: this dtype needs a CPU feature\nmore")

    monkeypatch.setattr(cpu_linear, "PackedLinear", Refusing)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    count, why = cpu_linear.pack_linears(model)
    assert count == 0 and "unavailable" in why and "more" not in why
    assert type(model[0]) is torch.nn.Linear


def test_onednn_linears_give_the_same_greedy_text_as_torch_linears(engine):
    """The default engine (oneDNN) against one loaded with `cpu_linear="torch"`: same greedy answers, batched."""
    assert engine.load_timings["cpu_linear"].startswith("onednn")
    plain = load_engine(EngineConfig(cpu_linear="torch"))
    assert plain.load_timings["cpu_linear"] == "torch"
    assert [r.text for r in engine.generate(MIXED)] == [r.text for r in plain.generate(MIXED)]


# ---- sampling, vectorized over the batch -----------------------------------------------------

def _sample_one(logits_row, req, generator):
    """The per-row reference: softmax at the row's temperature, its top-p cut, one draw."""
    import torch

    probs = torch.softmax(logits_row / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True, stable=True)
        cut = (sorted_p.cumsum(-1) - sorted_p) >= req.top_p
        cut[0] = False
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator)[0]), probs


def _batch_to_sample(n=24, vocab=4096):
    import torch

    torch.manual_seed(0)
    logits = torch.randn(n, vocab) * 4
    reqs = [Req(prompt="x", temperature=(0.0, 0.7, 1.0, 1.6)[i % 4], top_p=(1.0, 0.9, 0.5, 5e-324)[i // 4 % 4],
                seed=i if i % 3 else None) for i in range(n)]
    return logits, reqs


def _generators(engine, reqs):
    return [engine.generator(r) for r in reqs]


def test_batched_sampling_equals_the_per_row_reference_for_greedy_and_seeded_rows(engine):
    """One argmax for the greedy rows, one softmax and top-p cut for the sampled ones: a greedy row gets its
    argmax and a seeded row exactly the token its own generator draws alone, whatever its neighbours are."""
    logits, reqs = _batch_to_sample()
    tokens, errors = engine._sample(logits, reqs, _generators(engine, reqs))
    assert errors == {}
    reference = _generators(engine, reqs)
    for j, r in enumerate(reqs):
        if r.temperature == 0.0:
            assert tokens[j] == logits[j].argmax()
        elif reference[j] is not None:
            assert tokens[j] == _sample_one(logits[j], r, reference[j])[0], j
    # The same seeded rows in another batch (reversed, without the unseeded ones) draw the same tokens.
    seeded = [j for j, r in enumerate(reqs) if r.seed is not None][::-1]
    again, _ = engine._sample(logits[seeded], [reqs[j] for j in seeded], _generators(engine, [reqs[j] for j in seeded]))
    assert again.tolist() == tokens[seeded].tolist()


def test_unseeded_rows_draw_inside_their_own_top_p_and_a_bad_row_fails_alone(engine):
    import torch

    logits, reqs = _batch_to_sample()
    reqs = [Req(prompt="x", temperature=r.temperature, top_p=r.top_p) for r in reqs]  # all unseeded: one multinomial
    for _ in range(5):
        tokens, errors = engine._sample(logits, reqs, _generators(engine, reqs))
        assert errors == {}
        for j, r in enumerate(reqs):
            if r.temperature:
                assert _sample_one(logits[j], r, None)[1][tokens[j]] > 0, j  # a token the row's cut kept
    logits[5] = float("nan")  # a sampled row whose probabilities are not finite
    tokens, errors = engine._sample(logits, reqs, _generators(engine, reqs))
    assert list(errors) == [5] and isinstance(errors[5], RuntimeError)
    assert all(tokens[j] == logits[j].argmax() for j, r in enumerate(reqs) if r.temperature == 0.0)
    assert not torch.isnan(logits[6]).any() and 0 <= int(tokens[6]) < logits.shape[1]
