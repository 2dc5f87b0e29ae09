"""The load generator against a tiny in-process fake OpenAI server with known timings and failure modes."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import threading
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_server import serving
from llmserve_nb import bench
from llmserve_nb.bench import Action, BenchRun, Event, RequestResult, Timeline, Workload, run_observed
from llmserve_nb.cluster.ports import free_port
from llmserve_nb.stats import percentile

TTFT = 0.15  # the fake server's delay before the first chunk
GAP = 0.05  # between chunks
PER_CHUNK = 2  # tokens per chunk, so ITL (per chunk) and TPOT (per token) differ
SLACK = 0.005  # asyncio timers may fire this early
EOS_AT = 5  # mode "eos": without ignore_eos the fake model ends after this many tokens


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class FakeOpenAI:
    """`/{mode}/v1/completions`, where mode picks the behaviour; records every request body."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.hung_up = 0  # streams the server saw the client leave before their end
        self.app = Starlette(routes=[
            Route("/{mode}/v1/models", self.models),
            Route("/{mode}/v1/completions", self.completions, methods=["POST"]),
        ])

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request):
        mode = request.path_params["mode"]
        body = await request.json()
        self.bodies.append(body)
        n = body["max_tokens"]
        if mode == "eos" and not body.get("ignore_eos"):
            n = min(n, EOS_AT)
        gap = GAP * 4 if mode == "slowgap" else GAP
        if mode == "auth" and request.headers.get("authorization") != "Bearer sekret":
            return JSONResponse({"error": {"message": "invalid or missing API key"}}, status_code=401)
        if mode == "http400":
            return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
        if mode == "http500":
            return JSONResponse({"error": {"message": "engine died"}}, status_code=500)
        if mode == "json":
            await asyncio.sleep(TTFT)
            return JSONResponse({"choices": [{"text": "x" * n}], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
        if mode == "nojson":
            return Response("<html>oops</html>", media_type="text/html")

        async def stream():
            try:
                if mode == "slow":
                    await asyncio.sleep(3)
                await asyncio.sleep(TTFT)
                chunks = math.ceil(n / PER_CHUNK)
                for i in range(chunks):
                    if i:
                        await asyncio.sleep(gap)
                    yield _sse({"choices": [{"index": 0, "text": "ab" * PER_CHUNK}], "usage": None})
                    if mode == "truncated" and i == 1:
                        return
                    if mode == "garbage" and i == 0:
                        yield b"data: {not json\n\n"
                    if mode == "errorevent" and i == 0:
                        yield _sse({"error": {"message": "out of KV cache"}})
                    if mode == "multiline":  # one event over two data lines, after a comment: valid SSE
                        yield b": keep-alive\n\ndata: {\"choices\": [{\"index\": 0,\ndata: \"text\": \"cd\"}]}\n\n"
                if mode != "nousage":
                    yield _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
                yield b"data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                self.hung_up += 1
                raise

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake():
    srv = FakeOpenAI()
    with serving(srv.app, timeout_graceful_shutdown=1) as url:
        srv.url = url
        yield srv


def run(url, **kw):
    wl_kw = {k: kw.pop(k) for k in list(kw) if k in Workload.__dataclass_fields__}
    wl = Workload(**{"num_requests": 2, "output_tokens": 8, "timeout_s": 5, "duration_s": 10, **wl_kw})
    kw.setdefault("progress", False)
    if "rate" not in kw:
        kw.setdefault("concurrency", 1)
    return bench.run_benchmark(url, wl, **kw)


# ---- metric arithmetic on hand-made results ------------------------------------------------

def test_summary_metrics_from_known_timings():
    ok1 = RequestResult(0, "ok", streamed=True, start_s=0.0, ttft_s=0.1, e2e_s=1.1, chunk_times_s=[0.1, 0.3, 0.6, 1.1],
                        input_tokens=30, output_tokens=11, expected_output_tokens=11)
    ok2 = RequestResult(1, "ok", streamed=True, start_s=0.5, ttft_s=0.3, e2e_s=2.3, chunk_times_s=[0.3, 0.4],
                        input_tokens=30, output_tokens=21, expected_output_tokens=64)
    err = RequestResult(2, "error", error_kind="http_5xx", error="HTTP 500: boom", http_status=500)
    cut = RequestResult(3, "incomplete")
    run_ = BenchRun("x", "http://h", "m", Workload(num_requests=4), 2, None, 2.0, [ok1, ok2, err, cut])
    s = run_.summary()

    assert (s["completed"], s["errors"], s["incomplete"], s["err_http_5xx"], s["err_connect"]) == (2, 1, 1, 1, 0)
    assert s["output_tok_per_s"] == pytest.approx(32 / 2.0)
    assert s["req_per_s"] == pytest.approx(1.0)
    assert s["short_outputs"] == 1
    assert ok1.tpot_s == pytest.approx(0.1) and ok2.tpot_s == pytest.approx(0.1)
    assert s["tpot_ms_p50"] == pytest.approx(100.0)
    assert s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["ttft_ms_p90"] == pytest.approx(280.0)  # linear interpolation between 100 and 300
    assert s["itl_ms_p50"] == pytest.approx(250.0)  # pooled gaps 200, 300, 500, 100
    assert s["e2e_ms_p99"] == pytest.approx(1100 + 0.99 * 1200)
    assert s["error_example"] == "http_5xx: HTTP 500: boom"


def test_percentile_matches_numpy():
    import numpy as np
    vals = [random.Random(3).random() for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert math.isnan(percentile([], 50))


def test_prompts_are_deterministic_and_sized():
    a = bench.make_prompts(5, 30, seed=1)
    assert a == bench.make_prompts(5, 30, seed=1) and a != bench.make_prompts(5, 30, seed=2)
    # One token per word plus two for the prefix, in SmolLM2's tokenizer.
    assert all(len(p.split()) == 29 and p.startswith("Story:") for p in a)
    items = Workload(num_requests=50, input_tokens=(10, 20), output_tokens=(4, 9), seed=5).items()
    assert {n_in for _, n_in, _ in items} <= set(range(10, 21)) and len({n for _, _, n in items}) > 1
    assert items == Workload(num_requests=50, input_tokens=(10, 20), output_tokens=(4, 9), seed=5).items()


def test_mixed_workload_lengths_are_reproducible_and_span_the_range():
    wl = bench.mixed_workload(2000, seed=4)
    outs = [n for _, _, n in wl.items()]
    assert outs == [n for _, _, n in bench.mixed_workload(2000, seed=4).items()]
    assert outs != [n for _, _, n in bench.mixed_workload(2000, seed=5).items()]
    assert min(outs) == 16 and 480 <= max(outs) <= 512
    # Log-uniform over [16, 513): P(n <= 32) = ln(33/16) / ln(513/16) = 0.209, median near sqrt(16 * 513) = 90.6;
    # a uniform draw would give 0.034 and 264.
    assert 0.17 < sum(n <= 32 for n in outs) / len(outs) < 0.25
    assert 75 < sorted(outs)[len(outs) // 2] < 110
    assert wl.ignore_eos is False and "ignore_eos" not in wl.body("p", 16, None)
    # The fixed-length workload draws exactly what it did before the mixed one existed.
    assert {n for _, _, n in Workload(num_requests=50).items()} == {64}


def test_drops_are_seeded_and_leave_prompts_alone():
    wl = Workload(num_requests=1000, output_tokens=(4, 9), drop_fraction=0.25, drop_after_chunks=(2, 5), seed=3)
    drops = wl.drops()
    assert drops == Workload(num_requests=1000, output_tokens=(4, 9), drop_fraction=0.25,
                             drop_after_chunks=(2, 5), seed=3).drops()
    assert 0.2 < sum(d is not None for d in drops) / 1000 < 0.3
    assert {d for d in drops if d is not None} == {2, 3, 4, 5}
    assert wl.items() == Workload(num_requests=1000, output_tokens=(4, 9), seed=3).items()
    assert Workload(num_requests=5, drop_fraction=1.0, stream=False).drops() == [None] * 5
    with pytest.raises(ValueError):
        Workload(drop_fraction=1.5)


def _ok(i, e2e, out, ttft=0.1, chunks=None, start=0.0):
    chunks = chunks if chunks is not None else [ttft + (e2e - ttft) * k / max(1, out - 1) for k in range(out)]
    return RequestResult(i, "ok", streamed=True, start_s=start, end_s=start + e2e, ttft_s=ttft, e2e_s=e2e,
                         chunk_times_s=chunks, output_tokens=out, expected_output_tokens=512)


def test_short_and_long_requests_are_split_by_actual_tokens():
    rs = [_ok(0, 1.0, 32), _ok(1, 3.0, 20), _ok(2, 2.0, 33), _ok(3, 10.0, 400), _ok(4, 6.0, 100),
          RequestResult(5, "dropped", streamed=True, start_s=0, end_s=0.5, chunk_times_s=[0.1], output_tokens=1),
          RequestResult(6, "error", error_kind="timeout", error="t")]
    s = BenchRun("x", "u", "m", Workload(num_requests=7), 4, None, 10.0, rs).summary()
    assert (s["short_requests"], s["long_requests"], s["completed"], s["dropped"], s["errors"]) == (2, 3, 5, 1, 1)
    assert s["short_e2e_ms_p50"] == pytest.approx(2000.0) and s["short_e2e_ms_p99"] == pytest.approx(1000 + 0.99 * 2000)
    assert s["long_e2e_ms_p50"] == pytest.approx(6000.0)
    assert s["output_tok_per_s"] == pytest.approx((32 + 20 + 33 + 400 + 100) / 10.0)  # the dropped token is not useful
    assert s["e2e_ms_p50"] == pytest.approx(3000.0)  # dropped and failed requests are in no percentile


def test_windows_attribute_tokens_by_chunk_time_and_requests_by_end():
    # Request 0 streams 10 tokens in 5 chunks across the first boundary (3 chunks before it, 2 after).
    r0 = _ok(0, 14.0, 10, ttft=5.0, chunks=[5.0, 6.0, 8.0, 11.0, 14.0], start=1.0)  # TPOT 1 s
    r1 = _ok(1, 3.0, 4, ttft=1.0, chunks=[1.0, 3.0], start=12.0)  # 2 tokens per chunk, TPOT 2/3 s
    err = RequestResult(2, "error", error_kind="http_5xx", error="x", start_s=15.0, end_s=16.0)
    # Cut at the end after 2 chunks: counted at the completed requests' 14 tokens / 7 chunks.
    cut = RequestResult(3, "incomplete", streamed=True, start_s=17.0, chunk_times_s=[1.0, 2.0])
    run_ = BenchRun("x", "u", "m", Workload(num_requests=4), 2, None, 20.3, [r0, r1, err, cut])
    w = run_.windows(10.0)
    assert [row["window"] for row in w] == [1, 2]  # the 0.3 s overshoot joins the last window
    assert w[0]["streamed_tok_per_s"] == pytest.approx(6 / 10.0)
    assert w[1]["streamed_tok_per_s"] == pytest.approx((4 + 4 + 4) / 10.3)
    assert (w[0]["completed"], w[1]["completed"], w[1]["errors"]) == (0, 2, 1)
    assert w[1]["tpot_ms_p50"] == pytest.approx((1000 + 2 / 3 * 1000) / 2)
    assert math.isnan(w[0]["tpot_ms_p50"])
    table = bench.soak_table(run_, 10.0)
    assert math.isnan(table["tpot_vs_first"].iloc[-1])  # nothing ended in the first window: no ratio, no crash


# ---- against the fake server ---------------------------------------------------------------

def test_streaming_timings_and_usage(fake):
    r = run(fake.url + "/ok", num_requests=3, output_tokens=8)
    s = r.summary()
    assert s["completed"] == 3 and s["errors"] == 0
    assert r.model == "fake-model"
    body = fake.bodies[-1]
    assert body["ignore_eos"] is True and body["max_tokens"] == 8 and body["model"] == "fake-model"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    for rr in r.results:
        assert rr.tokens_from == "usage" and rr.output_tokens == 8 and rr.input_tokens == 7 and rr.streamed
        assert len(rr.chunk_times_s) == 4
        # Lower bounds are the server's real delays; upper bounds only rule out measuring something else
        # (they are loose because CI shares 2 cores with Ray clusters).
        assert TTFT - SLACK <= rr.ttft_s < TTFT + 2.0
        assert all(GAP - SLACK <= g < GAP + 1.0 for g in rr.itl_s)
        assert rr.e2e_s >= TTFT + 3 * GAP - SLACK
        assert rr.tpot_s == pytest.approx((rr.e2e_s - rr.ttft_s) / 7)
    # 4 chunks of 2 tokens: a chunk gap is ~2 token times, so ITL (per chunk) > TPOT (per token).
    assert s["itl_ms_p50"] > s["tpot_ms_p50"] * 1.5
    assert s["output_tok_per_s"] == pytest.approx(24 / r.duration_s)


def test_dropped_clients_are_counted_and_the_server_keeps_serving(fake):
    before = fake.hung_up
    # 16 tokens = 8 chunks; every dropping client leaves after 2 of them.
    r = run(fake.url + "/ok", num_requests=12, concurrency=3, output_tokens=16, drop_fraction=0.5,
            drop_after_chunks=2, seed=1)
    expected = [d is not None for d in r.workload.drops()]
    assert 0 < sum(expected) < 12
    assert [rr.status for rr in r.results] == ["dropped" if d else "ok" for d in expected]
    s = r.summary()
    assert (s["dropped"], s["errors"], s["completed"]) == (sum(expected), 0, 12 - sum(expected))
    for rr in r.results:
        if rr.status == "dropped":
            assert len(rr.chunk_times_s) == 2 and rr.tokens_from == "chunks" and math.isnan(rr.e2e_s)
    # The server noticed each hang-up (its stream was cancelled), and requests after a drop completed.
    deadline = time.monotonic() + 5
    while fake.hung_up - before < sum(expected) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.hung_up - before == sum(expected)
    first_drop_end = min(rr.end_s for rr in r.results if rr.status == "dropped")
    assert any(rr.status == "ok" and rr.start_s > first_drop_end for rr in r.results)


def test_eos_honoured_ends_requests_early_and_splits_short_ones(fake):
    r = run(fake.url + "/eos", num_requests=4, output_tokens=40, ignore_eos=False)
    s = r.summary()
    assert s["completed"] == 4 and s["short_outputs"] == 4 and s["mean_output_tokens"] == EOS_AT
    assert (s["short_requests"], s["long_requests"]) == (4, 0) and s["short_e2e_ms_p50"] > 0
    assert math.isnan(s["long_e2e_ms_p50"])
    r = run(fake.url + "/eos", num_requests=2, output_tokens=40)  # ignore_eos: all 40, so long
    assert r.summary()["long_requests"] == 2 and r.summary()["mean_output_tokens"] == 40


def test_soak_is_bounded_and_reports_windows(fake):
    t0 = time.monotonic()
    run_ = bench.soak(fake.url + "/ok", Workload(num_requests=10_000, output_tokens=4), duration_s=1.8,
                      concurrency=2, progress=False)
    assert time.monotonic() - t0 < 5
    table = bench.soak_table(run_, 0.6)
    assert list(table["window"]) == [1, 2, 3]
    assert (table["completed"] > 0).all() and (table["errors"] == 0).all()
    assert table["tpot_vs_first"].iloc[0] == pytest.approx(1.0)
    # Fake decode speed is constant, so the drift ratio stays near 1 (loose: CI shares its cores).
    assert 0.5 < table["tpot_vs_first"].iloc[-1] < 2.0


def test_without_usage_counts_chunks_or_tokenizer(fake):
    r = run(fake.url + "/nousage", num_requests=1, output_tokens=8)
    assert r.results[0].tokens_from == "chunks" and r.results[0].output_tokens == 4

    class CharTokenizer:
        def encode(self, text, add_special_tokens=True):
            return list(text)

    r = run(fake.url + "/nousage", num_requests=1, output_tokens=8, tokenizer=CharTokenizer())
    assert r.results[0].tokens_from == "tokenizer" and r.results[0].output_tokens == 16


def test_non_streaming_server_has_ttft_equal_e2e(fake):
    r = run(fake.url + "/json", num_requests=2)
    rr = r.results[0]
    assert r.summary()["completed"] == 2 and not rr.streamed
    assert rr.ttft_s == rr.e2e_s >= TTFT - SLACK and rr.output_tokens == 8
    assert math.isnan(rr.tpot_s) and rr.itl_s == []


@pytest.mark.parametrize(
    "mode, kind, fragment",
    [
        ("http400", "http_4xx", "HTTP 400"),
        ("http500", "http_5xx", "engine died"),
        ("garbage", "bad_stream", "non-JSON SSE data"),
        ("truncated", "bad_stream", "without [DONE]"),
        ("errorevent", "bad_stream", "out of KV cache"),
        ("nojson", "bad_stream", "neither SSE nor JSON"),
    ],
)
def test_failures_are_counted_per_kind(fake, mode, kind, fragment):
    r = run(fake.url + "/" + mode, num_requests=3, concurrency=2)
    s = r.summary()
    assert s["errors"] == 3 and s[f"err_{kind}"] == 3 and s["completed"] == 0
    assert fragment in s["error_example"]
    assert math.isnan(s["ttft_ms_p50"]) and s["output_tok_per_s"] == 0


def test_api_key_is_sent(fake):
    assert run(fake.url + "/auth", num_requests=1, api_key="sekret").summary()["completed"] == 1
    s = run(fake.url + "/auth", num_requests=1).summary()
    assert s["err_http_4xx"] == 1 and "API key" in s["error_example"]


def test_timeout_is_counted(fake):
    t0 = time.monotonic()
    r = run(fake.url + "/slow", num_requests=2, concurrency=2, timeout_s=0.4)
    assert time.monotonic() - t0 < 2.5
    assert r.summary()["err_timeout"] == 2


def test_server_down_is_a_connect_error():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = run(url, num_requests=4, concurrency=2)
    assert time.monotonic() - t0 < 5
    s = r.summary()
    assert s["err_connect"] == 4 and s["completed"] == 0 and r.model is None
    assert "ConnectError" in s["error_example"]


def test_request_count_bound(fake):
    before = len(fake.bodies)
    r = run(fake.url + "/ok", num_requests=5, concurrency=3, output_tokens=2)
    assert len(r.results) == 5 and r.summary()["completed"] == 5
    assert len(fake.bodies) - before == 5


def test_duration_bound_cuts_in_flight_requests(fake):
    t0 = time.monotonic()
    r = run(fake.url + "/slow", num_requests=50, concurrency=3, duration_s=0.6, timeout_s=30)
    elapsed = time.monotonic() - t0
    s = r.summary()
    assert elapsed < 2.0, elapsed
    # The 3 users each started one request; none finished (the server holds them for 3 s).
    assert (s["requests"], s["incomplete"], s["completed"], s["errors"]) == (3, 3, 0, 0)
    assert 0.55 <= r.duration_s < 1.5


def test_open_loop_follows_the_seeded_poisson_schedule(fake):
    rate, n = 25.0, 30
    r = run(fake.url + "/json", num_requests=n, rate=rate, output_tokens=2, arrival_seed=7)
    rng = random.Random(7)
    expected, t = [0.0], 0.0
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        expected.append(t)
    starts = [rr.start_s for rr in r.results]
    assert len(starts) == n and r.summary()["completed"] == n
    # Never early; late only by event-loop delay (generous: a loaded CI machine delays, never reorders).
    assert all(-0.02 < a - b < 0.5 for a, b in zip(starts, expected)), list(zip(starts, expected))
    observed_rate = (n - 1) / (starts[-1] - starts[0])
    assert rate / 2.5 < observed_rate < rate * 2.5


def test_open_loop_respects_duration(fake):
    rate, duration = 10.0, 1.0
    r = run(fake.url + "/json", num_requests=1000, rate=rate, output_tokens=2, duration_s=duration, arrival_seed=3)
    rng, t, due = random.Random(3), 0.0, 1
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        due += 1
    assert len(r.results) == due
    assert r.duration_s < duration + 3.0  # loose: a loaded CI machine delays the cut-off, never removes it


def test_sweep_report_files(fake, tmp_path):
    report = bench.sweep(fake.url + "/ok", Workload(num_requests=2, output_tokens=4), concurrency=[1, 2],
                         label="fake", progress=False)
    summary = report.summary()
    assert list(summary["concurrency"]) == [1, 2] and (summary["completed"] == 2).all()
    paths = report.save(tmp_path)
    data = json.loads(paths["report"].read_text())
    assert [run_["concurrency"] for run_ in data["runs"]] == [1, 2]
    assert len(data["runs"][0]["requests"]) == 2
    assert len(report.requests()) == 4
    assert paths["summary"].read_text().startswith("label,")


def test_ratio_table_divides_by_the_baseline_at_the_same_level():
    import pandas as pd
    summary = pd.DataFrame([
        {"label": "a", "concurrency": 1, "output_tok_per_s": 20.0, "ttft_ms_p50": 100.0, "tpot_ms_p50": 50.0, "e2e_ms_p50": 1000.0},
        {"label": "a", "concurrency": 8, "output_tok_per_s": 80.0, "ttft_ms_p50": 200.0, "tpot_ms_p50": 60.0, "e2e_ms_p50": 1500.0},
        {"label": "b", "concurrency": 8, "output_tok_per_s": 120.0, "ttft_ms_p50": 100.0, "tpot_ms_p50": 90.0, "e2e_ms_p50": 3000.0},
        {"label": "b", "concurrency": 32, "output_tok_per_s": 300.0, "ttft_ms_p50": 400.0, "tpot_ms_p50": 99.0, "e2e_ms_p50": 9000.0},
    ])
    t = bench.ratio_table(summary).set_index(["label", "concurrency"])
    assert t.loc[("b", 8), "output_tok_per_s_ratio"] == pytest.approx(1.5)
    assert t.loc[("b", 8), "ttft_ms_p50_ratio"] == pytest.approx(0.5)
    assert t.loc[("b", 8), "tpot_ms_p50_ratio"] == pytest.approx(1.5)
    assert t.loc[("b", 8), "e2e_ms_p50_ratio"] == pytest.approx(2.0)
    assert math.isnan(t.loc[("b", 32), "output_tok_per_s_ratio"])  # "a" never ran c=32
    flipped = bench.ratio_table(summary, baseline="b").set_index(["label", "concurrency"])
    assert flipped.loc[("a", 8), "output_tok_per_s_ratio"] == pytest.approx(80 / 120)
    md = bench.to_markdown(flipped.reset_index(), ["label", "concurrency", "output_tok_per_s_ratio"])
    assert md.splitlines()[0] == "| label | concurrency | output_tok_per_s_ratio |" and "| a | 8 | 0.67 |" in md


def test_plots_render(fake):
    import matplotlib

    matplotlib.use("Agg")
    report = bench.sweep(fake.url + "/ok", Workload(num_requests=2, output_tokens=4), concurrency=[1, 2],
                         progress=False, warmup=0)
    assert len(bench.plot_throughput_latency(report).lines) == 1
    assert len(bench.plot_latency_cdf(report, "ttft").lines) == 2
    assert len(bench.plot_ttft_vs_concurrency(report).lines) == 2


class _FakeCluster:
    """Stands in for `cluster.connect()`: the n-th deploy points at the n-th URL."""

    def __init__(self, urls):
        self.urls, self.deployed, self.shut = list(urls), [], 0

    def deploy(self, cfg):
        self.deployed.append(cfg)
        cluster, url = self, self.urls[len(self.deployed) - 1]

        class App:
            base_url, model, name = url, "fake-model", cfg.name

            def shutdown(self):
                cluster.shut += 1

        return App()


def test_compare_configs_deploys_each_and_shuts_down(fake, tmp_path):
    from llmserve_nb.config import AppConfig

    base = AppConfig()
    # The second "config" is a server whose chunk gaps are 4x longer: its throughput ratio must show it.
    cluster = _FakeCluster([fake.url + "/ok", fake.url + "/slowgap", fake.url + "/ok"])
    table = bench.compare_configs(
        cluster, [base, base.with_overrides(**{"batching.max_batch_size": 1}), ("two", base.with_overrides(name="two"))],
        Workload(num_requests=2, output_tokens=8), concurrency=[1], out_dir=tmp_path, progress=False,
    )
    # The first two share the app name: the second is deployed over the first (Serve updates in place);
    # the app is shut down only before the differently named third and at the end.
    assert len(cluster.deployed) == 3 and cluster.shut == 2
    assert list(table["label"]) == ["baseline", "batching.max_batch_size=1", "two"]
    assert (table["completed"] == 2).all()
    tps = list(table["output_tok_per_s"])
    assert table["output_tok_per_s_ratio"].iloc[1] == pytest.approx(tps[1] / tps[0])
    assert table["output_tok_per_s_ratio"].iloc[1] < 0.8
    assert table["tpot_ms_p50_ratio"].iloc[1] > 1.5
    assert len(list(tmp_path.glob("*/report.json"))) == 3


def test_compare_configs_shuts_the_app_down_when_a_later_deploy_fails(fake):
    from llmserve_nb.config import AppConfig

    cluster = _FakeCluster([fake.url + "/ok"])  # a second deploy has no URL: it raises
    base = AppConfig()
    with pytest.raises(IndexError):
        bench.compare_configs(cluster, [base, base.with_overrides(**{"batching.max_batch_size": 1})],
                              Workload(num_requests=1, output_tokens=2), concurrency=[1], progress=False)
    assert cluster.shut == 1


def _cli(argv):
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_tiny_workload(fake, tmp_path, capsys):
    rc = _cli(["bench", "--url", fake.url + "/ok", "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4",
               "--out", str(tmp_path / "b"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("| label | concurrency |") and out.count("\n| run |") == 2
    assert json.loads((tmp_path / "b" / "report.json").read_text())["runs"][1]["summary"]["completed"] == 2


def test_cli_mixed_soak(fake, capsys):
    rc = _cli(["bench", "--url", fake.url + "/eos", "--concurrency", "2", "--requests", "1000", "--mixed",
               "--max-tokens", "4-40", "--drop-fraction", "0.3", "--soak", "0.02", "--window", "0.6", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("| window | completed |") and "TPOT p50, last window / first:" in out
    body = fake.bodies[-1]
    assert "ignore_eos" not in body and 4 <= body["max_tokens"] <= 40


def test_cli_server_down_exits_1_with_reason(capsys):
    rc = _cli(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1", "--requests", "2",
               "--no-progress", "--warmup", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "connect=2" in err and "no request" in err


def test_an_event_over_several_data_lines_is_one_chunk(fake):
    r = run(fake.url + "/multiline", num_requests=1, output_tokens=8)
    rr = r.results[0]
    assert rr.status == "ok", rr.error
    # 4 chunks of "abab" and, after each, one event split over two data lines (joined, it is valid JSON).
    assert len(rr.chunk_times_s) == 8 and rr.tokens_from == "usage" and rr.output_tokens == 8


# ---- run_observed: the one load-and-observe harness ---------------------------------------------

def test_run_observed_samples_while_a_long_action_runs_and_once_after_it():
    taken: list[int] = []
    third = threading.Event()

    def count() -> int:
        taken.append(len(taken) + 1)
        if len(taken) == 3:
            third.set()
        return taken[-1]

    def recover() -> str:  # like kill-and-wait-for-the-replacement: returns only once sampling went on
        assert third.wait(10)
        return "recovered"

    tl = run_observed(lambda: "load done", {"count": count}, [Action(0.0, "kill", recover)], every_s=0.02)
    kill = tl.event("kill")
    assert tl.result == "load done" and tl.ended
    assert (kill.value, kill.error) == ("recovered", None) and kill.t_s <= kill.ended_s
    counts = tl.values("count")
    assert counts == list(range(1, len(counts) + 1)) and len(counts) >= 4  # 3 while the action ran, 1 after
    assert tl.series("count")[-1][0] >= kill.ended_s


def test_run_observed_records_failures_and_fires_nothing_after_the_load():
    def broken_sampler():
        raise ValueError("dashboard busy")

    def broken_action():
        raise RuntimeError("kill failed")

    tl = run_observed(lambda: 7, {"bad": broken_sampler, "good": lambda: 1},
                      [Action(0.0, "boom", broken_action), Action(60.0, "late", lambda: "never")], every_s=0.02)
    assert tl.result == 7 and tl.duration_s < 5
    assert [e.name for e in tl.events] == ["boom"]
    assert isinstance(tl.events[0].error, RuntimeError) and tl.events[0].value is None
    assert tl.samples["bad"] == [] and len(tl.sample_errors["bad"]) == len(tl.samples["good"])
    assert all(isinstance(e, ValueError) for _, e in tl.sample_errors["bad"])

    seen = []

    def crash():
        raise ConnectionError("load generator broke")

    with pytest.raises(ConnectionError, match="load generator broke"):
        run_observed(crash, {"n": lambda: 1}, on_sample=lambda t: seen.append(len(t.values("n"))), every_s=0.02)
    assert seen and seen[-1] == len(seen)  # the timeline was completed before the load's error surfaced


def test_run_observed_tells_a_sample_taken_before_the_load_ended_from_one_after():
    # The first sample's read outlasts the load (a slow status call): it is recorded after the load ended,
    # but was taken before; `load_ended_s` tells them apart, where `result` being set would not.
    release = threading.Event()

    def load() -> str:
        assert release.wait(10)
        return "done"

    def slow_status() -> int:
        release.set()
        return 1

    tl = run_observed(load, {"s": slow_status}, every_s=10)
    assert tl.result == "done" and tl.load_ended_s is not None
    times = [t for t, _ in tl.series("s")]
    assert len(times) >= 2 and times[0] <= tl.load_ended_s <= times[-1], (times, tl.load_ended_s)


def test_run_observed_without_a_load_stops_when_told():
    stop = threading.Event()

    def enough(tl):
        if len(tl.values("n")) == 2:
            stop.set()

    tl = run_observed(None, {"n": lambda: 5}, duration_s=60, stop=stop, on_sample=enough, every_s=0.01)
    assert tl.values("n") == [5, 5] and tl.duration_s < 5
    with pytest.raises(ValueError, match="a load or a duration_s"):
        run_observed(None, {"n": lambda: 5})


def test_wait_for_finds_a_sample_taken_before_the_wait_and_waits_for_new_ones():
    done = Timeline(samples={"workers": [(0.0, 1), (1.0, 0), (2.0, 1), (3.0, 1)]}, ended=True)
    assert done.wait_for("workers", lambda n: n == 1, since_s=0.5, timeout_s=1.0) == (2.0, 1)
    with pytest.raises(LookupError, match="run ended"):
        done.wait_for("workers", lambda n: n == 2, timeout_s=1.0)
    with pytest.raises(TimeoutError, match="within 0.05s"):
        Timeline(samples={"workers": [(0.0, 1)]}).wait_for("workers", lambda n: n == 2, timeout_s=0.05)

    # Live: the load waits on the samples the harness takes meanwhile, and marks what it did.
    tl: Timeline = Timeline()
    counter = iter(range(100))

    def load():
        t, n = tl.wait_for("n", lambda n: n >= 3, timeout_s=10)
        tl.mark("saw 3", n)
        return t

    run_observed(load, {"n": lambda: next(counter)}, every_s=0.01, timeline=tl)
    assert tl.series("n")[3] == (tl.result, 3)
    mark = tl.event("saw 3")
    assert mark.value == 3 and mark.ended_s is None and mark.t_s >= tl.result


def test_shifted_moves_every_time_onto_the_later_clock():
    tl = Timeline(result="run", samples={"r": [(1.0, ["a"]), (2.5, [])]}, sample_errors={"r": [(3.0, OSError())]},
                  events=[Event(2.0, "kill", {"replica_id": "a"}, ended_s=4.0), Event(2.2, "note")], duration_s=9.0)
    moved = tl.shifted(0.5)
    assert moved.result == "run" and moved.duration_s == 9.0
    assert moved.series("r") == [(0.5, ["a"]), (2.0, [])] and moved.sample_errors["r"][0][0] == 2.5
    assert [(e.t_s, e.name, e.ended_s) for e in moved.events] == [(1.5, "kill", 3.5), (1.7, "note", None)]
    assert moved.t0 == tl.t0 + 0.5 and tl.series("r")[0] == (1.0, ["a"])  # the original is unchanged
