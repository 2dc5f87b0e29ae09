"""Goodput under an SLO, open-loop arrival processes, trace replay and the prefix-repetition workload.

The arithmetic runs on hand-made results with chosen timings; the load patterns run against a tiny
in-process fake OpenAI server with a fixed TTFT (no Ray).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import statistics
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from asgi_server import serving
from llmserve_nb import bench
from llmserve_nb.bench import SLO, BenchRun, RequestResult, Workload

FAKE_TTFT = 0.1  # the fake server's delay before its first chunk; no request can beat it
SLACK = 0.005  # asyncio timers may fire this early


# ---- SLO: parsing and what is good ------------------------------------------------------------

def test_slo_parse_reads_units_and_percentages():
    slo = SLO.parse("ttft=1s,tpot=100ms,e2e=10s,attainment=99%")
    assert slo == SLO(ttft_s=1.0, tpot_s=0.1, e2e_s=10.0, attainment=0.99)
    assert SLO.parse("itl=250us e2e=2") == SLO(itl_s=250e-6, e2e_s=2.0)  # spaces separate too; bare = seconds
    assert SLO.parse("TTFT=0.5s, attainment=0.9").attainment == 0.9
    assert SLO.parse("ttft=1.5e3ms").ttft_s == pytest.approx(1.5)
    assert SLO.parse(str(slo)) == slo and str(slo) == "ttft=1000ms,tpot=100ms,e2e=10000ms,attainment=99%"
    assert SLO(ttft_s=1).bounds == {"ttft_s": 1}
    with pytest.raises(AttributeError):
        slo.ttft_s = 2.0  # frozen: a run's SLO cannot change under it


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty SLO"),
    ("latency=1s", "unknown SLO key 'latency'"),
    ("ttft=1h", "unknown unit 'h'"),
    ("ttft=-1s", "must not be negative"),
    ("ttft", "not key=value"),
    ("ttft=fast", "not a number with a unit"),
    ("ttft=1s,ttft=2s", "given twice"),
    ("attainment=0.99s", "fraction (0.99) or a percentage"),
    ("attainment=150%", "attainment must be in (0, 1]"),
    ("ttft=0s", "positive number of seconds"),
])
def test_slo_parse_rejects_bad_input_clearly(spec, fragment):
    with pytest.raises(ValueError) as e:
        SLO.parse(spec)
    assert fragment in str(e.value)


def test_slo_constructor_validates():
    for bad in (dict(ttft_s=-1), dict(e2e_s=math.inf), dict(tpot_s="1s"), dict(attainment=0), dict(attainment=1.01)):
        with pytest.raises(ValueError):
            SLO(**bad)


def _r(i, status="ok", ttft=0.2, e2e=1.2, out=11, streamed=True, chunks=None, **kw):
    """A request with chosen timings; TPOT = (e2e - ttft) / (out - 1) when streamed."""
    if status != "ok":
        return RequestResult(i, status, **kw)
    return RequestResult(i, "ok", streamed=streamed, start_s=0.0, end_s=e2e, ttft_s=ttft, e2e_s=e2e,
                         chunk_times_s=chunks if chunks is not None else [ttft, e2e], output_tokens=out,
                         expected_output_tokens=out, **kw)


def _known_run(slo=None):
    results = [
        _r(0, ttft=0.2, e2e=1.2, out=11),  # TPOT 0.1: good
        _r(1, ttft=1.5, e2e=2.5, out=11),  # TTFT over 1 s
        _r(2, ttft=0.3, e2e=3.3, out=11),  # TPOT 0.3 over 0.2
        _r(3, ttft=0.5, e2e=0.5, out=1),  # one token: TPOT undefined, so not bounded: good
        _r(4, ttft=0.1, e2e=12.0, out=100),  # e2e over 10 s
        _r(5, "error", error_kind="timeout", error="t"),  # ended: counts, not good
        _r(6, "dropped", streamed=True, chunk_times_s=[0.1]),  # left on purpose: not counted
        _r(7, "incomplete"),  # cut by the run's end: not counted
        _r(8, ttft=0.8, e2e=0.8, out=50, streamed=False, chunks=[0.8]),  # unstreamed: no TPOT: good
    ]
    return BenchRun("x", "http://h", "m", Workload(num_requests=9), None, 2.0, 4.0, results, slo=slo)


def test_goodput_counts_exactly_on_known_results():
    slo = SLO(ttft_s=1.0, tpot_s=0.2, e2e_s=10.0)
    run = _known_run(slo)
    assert [slo.good(r) for r in run.results] == [True, False, False, True, False, False, False, False, True]
    s = run.summary()
    assert (s["good_requests"], s["slo_requests"]) == (3, 7)
    assert s["goodput_req_per_s"] == pytest.approx(3 / 4.0)
    assert s["goodput_tok_per_s"] == pytest.approx((11 + 1 + 50) / 4.0)
    assert s["slo_attainment"] == pytest.approx(3 / 7)
    assert s["slo_met"] is False
    assert s["slo"] == "ttft=1000ms,tpot=200ms,e2e=10000ms,attainment=99%"
    # Throughput counts every completed request; goodput only the good ones.
    assert s["req_per_s"] == pytest.approx(6 / 4.0) and s["output_tok_per_s"] == pytest.approx(184 / 4.0)
    looser = run.goodput(SLO(ttft_s=1.0, tpot_s=0.2, e2e_s=10.0, attainment=0.4))
    assert looser["slo_met"] is True and looser["good_requests"] == 3  # 3/7 = 0.43 >= 0.4
    assert run.goodput(SLO(e2e_s=20.0))["good_requests"] == 6  # the error is never good
    assert list(run.to_frame()["good"]) == [True, False, False, True, False, False, False, False, True]


def test_without_an_slo_the_goodput_keys_are_absent():
    run = _known_run()
    s = run.summary()
    assert not {"good_requests", "goodput_req_per_s", "goodput_tok_per_s", "slo_attainment", "slo_met"} & set(s)
    assert "good" not in run.to_frame().columns
    with pytest.raises(ValueError, match="no SLO"):
        run.goodput()
    # A run without its own SLO can still be judged against one.
    assert run.goodput(SLO(ttft_s=1.0))["good_requests"] == 5


def test_attainment_edges():
    slo = SLO(e2e_s=1.0)  # attainment 0.99
    ok = [_r(i, e2e=0.5) for i in range(99)]
    run = BenchRun("x", "u", "m", Workload(), 1, None, 10.0, ok + [_r(99, e2e=2.0)], slo=slo)
    g = run.goodput()
    assert g["slo_attainment"] == pytest.approx(0.99) and g["slo_met"] is True  # exactly at the target
    run.results.append(_r(100, "error", error_kind="http_5xx", error="x"))
    assert run.goodput()["slo_met"] is False  # 99/101
    empty = BenchRun("x", "u", "m", Workload(), 1, None, 1.0, [_r(0, "incomplete")], slo=slo).goodput()
    assert (empty["slo_requests"], empty["slo_attainment"], empty["slo_met"]) == (0, 0.0, False)


def test_itl_bound_is_the_worst_gap_of_each_request():
    r = _r(0, ttft=0.1, e2e=0.9, out=3, chunks=[0.1, 0.2, 0.9])  # gaps 0.1 and 0.7
    assert not SLO(itl_s=0.5).good(r) and SLO(itl_s=0.7).good(r)
    assert SLO(tpot_s=0.4).good(r) and not SLO(tpot_s=0.39).good(r)  # TPOT (0.9-0.1)/2 = 0.4


def test_goodput_ratios_and_markdown_columns():
    import pandas as pd
    summary = pd.DataFrame([
        {"label": "a", "concurrency": None, "rate": 1.0, "output_tok_per_s": 20.0, "ttft_ms_p50": 100.0,
         "tpot_ms_p50": 50.0, "e2e_ms_p50": 1000.0, "goodput_req_per_s": 1.0, "goodput_tok_per_s": 60.0},
        {"label": "a", "concurrency": None, "rate": 2.0, "output_tok_per_s": 40.0, "ttft_ms_p50": 100.0,
         "tpot_ms_p50": 50.0, "e2e_ms_p50": 1000.0, "goodput_req_per_s": 0.0, "goodput_tok_per_s": 0.0},
        {"label": "b", "concurrency": None, "rate": 1.0, "output_tok_per_s": 30.0, "ttft_ms_p50": 50.0,
         "tpot_ms_p50": 50.0, "e2e_ms_p50": 800.0, "goodput_req_per_s": 0.5, "goodput_tok_per_s": 90.0},
        {"label": "b", "concurrency": None, "rate": 2.0, "output_tok_per_s": 60.0, "ttft_ms_p50": 50.0,
         "tpot_ms_p50": 50.0, "e2e_ms_p50": 800.0, "goodput_req_per_s": 1.5, "goodput_tok_per_s": 90.0},
    ])
    t = bench.ratio_table(summary).set_index(["label", "rate"])
    assert t.loc[("b", 1.0), "goodput_req_per_s_ratio"] == pytest.approx(0.5)
    assert t.loc[("b", 1.0), "goodput_tok_per_s_ratio"] == pytest.approx(1.5)
    assert math.isnan(t.loc[("b", 2.0), "goodput_req_per_s_ratio"])  # the baseline had no goodput there
    assert t.loc[("b", 1.0), "output_tok_per_s_ratio"] == pytest.approx(1.5)
    assert "goodput_req_per_s_ratio" not in bench.ratio_table(summary.drop(columns=["goodput_req_per_s"])).columns


# ---- arrivals -------------------------------------------------------------------------------

def _gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("arrival, burstiness, cv", [("poisson", 1.0, 1.0), ("gamma", 0.5, 2 ** 0.5),
                                                     ("gamma", 4.0, 0.5), ("gamma", 1.0, 1.0)])
def test_arrival_gaps_have_the_rate_and_the_burstiness(arrival, burstiness, cv):
    times = bench.arrival_times(20_000, 4.0, arrival, burstiness, seed=11)
    gaps = _gaps(times)
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.05)
    assert times == bench.arrival_times(20_000, 4.0, arrival, burstiness, seed=11)
    assert times != bench.arrival_times(20_000, 4.0, arrival, burstiness, seed=12)


def test_gamma_with_burstiness_one_is_the_poisson_schedule():
    assert bench.arrival_times(50, 3.0, "gamma", 1.0, seed=5) == bench.arrival_times(50, 3.0, seed=5)
    # ... which is the schedule open-loop runs have always drawn: exponential gaps from Random(seed).
    import random
    rng, t, expected = random.Random(5), 0.0, [0.0]
    for _ in range(49):
        t += rng.expovariate(3.0)
        expected.append(t)
    assert bench.arrival_times(50, 3.0, seed=5) == expected


@pytest.mark.parametrize("kw, fragment", [
    (dict(rate=0), "rate must be > 0"),
    (dict(rate=1, arrival="uniform"), "arrival must be one of"),
    (dict(rate=1, arrival="gamma", burstiness=0), "burstiness must be > 0"),
    (dict(rate=1, burstiness=0.5), "needs arrival='gamma'"),
])
def test_arrival_arguments_are_checked(kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        bench.arrival_times(3, **kw)


# ---- workloads: byte-identical defaults, the prefix-repetition one --------------------------

def _digest(x) -> str:
    return hashlib.sha256(repr(x).encode()).hexdigest()[:16]


def test_existing_workloads_are_byte_identical():
    # Digests of what these workloads drew before prefix workloads existed (same prompts, lengths, drops).
    wl = Workload()
    assert _digest((wl.items(), wl.drops())) == "8c99d0eec9d5a503"
    wl = Workload(num_requests=200, input_tokens=(1, 40), output_tokens=(4, 90), seed=3, drop_fraction=0.3)
    assert _digest((wl.items(), wl.drops())) == "dc016903a9faeb3d"
    assert _digest(bench.mixed_workload(100, seed=2).items()) == "67a5687893ad3187"
    assert Workload().prefix_ids() is None


def test_prefix_workload_shares_seeded_prefixes():
    wl = Workload(num_requests=12, input_tokens=5, output_tokens=8, shared_prefix_tokens=20, num_prefixes=3, seed=4)
    items = wl.items()
    ids = wl.prefix_ids()
    assert sorted(ids) == [0] * 4 + [1] * 4 + [2] * 4 and ids != sorted(ids)  # balanced, in a seeded order
    assert all(n_in == 25 and n_out == 8 for _, n_in, n_out in items)
    # "Story:" (2 tokens) + 18 words of prefix, then 5 words of its own: one token per word.
    prefixes = {" ".join(p.split()[:19]) for p, _, _ in items}
    assert len(prefixes) == 3
    for (prompt, _, _), j in zip(items, ids):
        words = prompt.split()
        assert len(words) == 24 and words[0] == "Story:"
        assert all(" ".join(q.split()[:19]) == " ".join(words[:19]) for (q, _, _), k in zip(items, ids) if k == j)
    assert len({p for p, _, _ in items}) == 12  # every suffix is its own
    assert items == Workload(num_requests=12, input_tokens=5, output_tokens=8, shared_prefix_tokens=20,
                             num_prefixes=3, seed=4).items()
    other = Workload(num_requests=12, input_tokens=5, output_tokens=8, shared_prefix_tokens=20, num_prefixes=3, seed=5)
    assert not prefixes & {" ".join(p.split()[:19]) for p, _, _ in other.items()}
    with pytest.raises(ValueError, match="num_prefixes"):
        Workload(shared_prefix_tokens=8, num_prefixes=0)


# ---- trace files ---------------------------------------------------------------------------

def _write(tmp_path, lines, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_trace_is_loaded_relative_and_in_time_order(tmp_path):
    path = _write(tmp_path, [
        {"timestamp": 1700000002.5, "input_tokens": 10, "output_tokens": 4, "extra": "ignored"},
        "",
        {"timestamp": 1700000001.0, "input_tokens": 20, "output_tokens": 8, "prompt": "hello there"},
        {"timestamp": 1700000004, "input_tokens": 30, "output_tokens": 2},
    ])
    reqs = bench.load_trace(path)
    assert [(r.timestamp_s, r.input_tokens, r.output_tokens, r.prompt) for r in reqs] == [
        (0.0, 20, 8, "hello there"), (1.5, 10, 4, None), (3.0, 30, 2, None)]


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"timestamp": 1, "input_tokens": 3}', "missing output_tokens"),
    ('{"timestamp": "10:00", "input_tokens": 3, "output_tokens": 4}', "timestamp must be a number"),
    ('{"timestamp": 1, "input_tokens": 0, "output_tokens": 4}', "input_tokens must be an integer >= 1, got 0"),
    ('{"timestamp": 1, "input_tokens": 3, "output_tokens": 2.5}', "output_tokens must be an integer"),
    ('{"timestamp": 1, "input_tokens": true, "output_tokens": 4}', "input_tokens must be an integer"),
    ('{"timestamp": 1, "input_tokens": 3, "output_tokens": 4, "prompt": 7}', "prompt must be a string"),
])
def test_a_bad_trace_line_is_named(tmp_path, line, fragment):
    path = _write(tmp_path, [{"timestamp": 0, "input_tokens": 3, "output_tokens": 4}, "", line])
    with pytest.raises(ValueError) as e:
        bench.load_trace(path)
    assert f"{path}:3: " in str(e.value) and fragment in str(e.value)


def test_an_empty_trace_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        bench.load_trace(_write(tmp_path, ["", "  "]))


# ---- against a fake server ------------------------------------------------------------------

class Fake:
    """`/v1/completions` streaming max_tokens one-token chunks after FAKE_TTFT; records when each request came."""

    def __init__(self):
        self.seen: list[tuple[float, dict]] = []
        self.app = Starlette(routes=[Route("/v1/models", self.models),
                                     Route("/v1/completions", self.completions, methods=["POST"])])

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: Request):
        body = await request.json()
        self.seen.append((time.perf_counter(), body))
        n = body["max_tokens"]

        async def stream():
            await asyncio.sleep(FAKE_TTFT)
            for _ in range(n):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x'}]})}\n\n".encode()
            usage = {"prompt_tokens": 5, "completion_tokens": n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake():
    srv = Fake()
    with serving(srv.app, timeout_graceful_shutdown=1) as url:
        srv.url = url
        yield srv


def _wl(**kw):
    return Workload(**{"num_requests": 6, "output_tokens": 3, "timeout_s": 5, "duration_s": 20, **kw})


def test_gamma_open_loop_follows_its_schedule(fake):
    run = bench.run_benchmark(fake.url, _wl(num_requests=12), rate=20.0, arrival="gamma", burstiness=0.5,
                              arrival_seed=3, progress=False)
    expected = bench.arrival_times(12, 20.0, "gamma", 0.5, seed=3)
    starts = [r.start_s for r in run.results]
    assert run.summary()["completed"] == 12 and (run.arrival, run.burstiness, run.rate) == ("gamma", 0.5, 20.0)
    # Never early; late only by event-loop delay (generous: a loaded CI machine delays, never reorders).
    assert all(-0.02 < a - b < 0.5 for a, b in zip(starts, expected)), list(zip(starts, expected))


def test_rate_sweep_reports_goodput_against_the_slo(fake):
    # No request can have its first token before FAKE_TTFT, and all have it well within 30 s.
    report = bench.sweep(fake.url, _wl(), rates=[20, 40], slo=SLO(ttft_s=30), warmup=0, progress=False)
    s = report.summary()
    assert list(s["rate"]) == [20, 40] and list(s["arrival"]) == ["poisson", "poisson"]
    assert list(s["good_requests"]) == [6, 6] and s["slo_met"].all() and (s["slo_attainment"] == 1.0).all()
    assert list(s["goodput_tok_per_s"]) == pytest.approx(list(s["output_tok_per_s"]))
    strict = bench.sweep(fake.url, _wl(), rates=[20], slo=SLO(ttft_s=FAKE_TTFT - SLACK), warmup=0, progress=False)
    row = strict.summary().iloc[0]
    assert (row["good_requests"], row["goodput_req_per_s"], row["slo_met"]) == (0, 0.0, False)
    with pytest.raises(ValueError, match="needs arrival='gamma'"):  # before any request is sent
        bench.sweep("http://127.0.0.1:9", _wl(), rates=[1], burstiness=2.0, progress=False)


def test_replay_sends_at_the_scaled_timestamps(fake, tmp_path):
    path = _write(tmp_path, [{"timestamp": 100.0, "input_tokens": 4, "output_tokens": 2},
                             {"timestamp": 100.6, "input_tokens": 6, "output_tokens": 5, "prompt": "my own words"},
                             {"timestamp": 101.0, "input_tokens": 8, "output_tokens": 3}])
    before = len(fake.seen)
    run = bench.replay(fake.url, path, _wl(), time_scale=0.5, slo=SLO(ttft_s=30), progress=False)
    s = run.summary()
    assert (s["completed"], s["good_requests"], run.arrival) == (3, 3, "trace")
    assert run.rate == pytest.approx(2 / 0.5)  # 3 requests over 0.5 s once scaled
    starts = [r.start_s for r in run.results]
    assert all(-0.02 < a - b < 0.5 for a, b in zip(starts, [0.0, 0.3, 0.5])), starts
    bodies = [b for _, b in fake.seen[before:]]
    assert [b["max_tokens"] for b in bodies] == [2, 5, 3] and bodies[1]["prompt"] == "my own words"
    assert len(bodies[0]["prompt"].split()) == 3  # a made-up 4-token prompt: "Story:" + 2 words
    assert [r.expected_output_tokens for r in run.results] == [2, 5, 3]
    with pytest.raises(ValueError, match="time_scale"):
        bench.replay(fake.url, path, time_scale=0)


def test_compare_configs_with_an_slo_has_goodput_ratios(fake):
    from llmserve_nb.config import AppConfig

    class Cluster:
        def deploy(self, cfg):
            class App:
                base_url, model, name = fake.url, "fake-model", cfg.name

                def shutdown(self):
                    pass
            return App()

    base = AppConfig()
    table = bench.compare_configs(Cluster(), [base, ("same", base)], _wl(num_requests=3), rates=[20],
                                  slo=SLO(ttft_s=30), progress=False)
    assert list(table["rate"]) == [20, 20] and table["concurrency"].isna().all()
    assert list(table["good_requests"]) == [3, 3]
    assert {"goodput_req_per_s_ratio", "goodput_tok_per_s_ratio"} <= set(table.columns)
    assert table["goodput_req_per_s_ratio"].iloc[0] == pytest.approx(1.0)


def test_plot_goodput(fake):
    import matplotlib

    matplotlib.use("Agg")
    report = bench.sweep(fake.url, _wl(num_requests=3), rates=[10, 20], slo=SLO(ttft_s=30), warmup=0, progress=False)
    ax = bench.plot_goodput(report)
    assert len(ax.lines) == 1 and list(ax.lines[0].get_xdata()) == [10, 20]
    right = [a for a in ax.figure.axes if a is not ax][0]
    assert len(right.lines) == 2 and list(right.lines[0].get_ydata()) == [1.0, 1.0]  # attainment, then the target
    with pytest.raises(ValueError, match="no goodput"):
        bench.plot_goodput(bench.sweep(fake.url, _wl(num_requests=1), concurrency=[1], warmup=0, progress=False))


# ---- the CLI -------------------------------------------------------------------------------

def _cli(argv):
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_parses_the_new_flags():
    parser = argparse.ArgumentParser()
    bench.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--slo", "ttft=1s,tpot=100ms", "--rate", "1,2,4", "--arrival", "gamma",
                              "--burstiness", "0.5", "--shared-prefix-tokens", "64", "--num-prefixes", "2"])
    assert args.slo == SLO(ttft_s=1.0, tpot_s=0.1) and args.rate == [1.0, 2.0, 4.0]
    assert (args.arrival, args.burstiness, args.shared_prefix_tokens, args.num_prefixes) == ("gamma", 0.5, 64, 2)
    args = parser.parse_args(["bench", "--trace", "t.jsonl", "--time-scale", "0.25"])
    assert (args.trace, args.time_scale, args.rate) == ("t.jsonl", 0.25, None)


def test_cli_bad_slo_exits_2_with_the_reason(capsys):
    with pytest.raises(SystemExit) as e:
        _cli(["bench", "--slo", "latency=1s"])
    assert e.value.code == 2 and "unknown SLO key 'latency'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["bench", "--rate", "1", "--trace", "t.jsonl"])  # one load pattern at a time


def test_cli_gamma_rates_with_an_slo(fake, capsys):
    rc = _cli(["bench", "--url", fake.url, "--rate", "20,40", "--burstiness", "0.5", "--requests", "4",
               "--max-tokens", "3", "--slo", "ttft=30s,attainment=90%", "--shared-prefix-tokens", "12",
               "--no-progress", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    header = out.splitlines()[0]
    assert "| goodput_req_per_s | goodput_tok_per_s | slo_attainment | slo_met |" in header
    assert "SLO ttft=30000ms,attainment=90%: gamma 20 req/s met (100.0% good); gamma 40 req/s met" in out
    prompt = fake.seen[-1][1]["prompt"]
    assert prompt.startswith("Story:") and len(prompt.split()) == 11 + 30  # 12-token prefix, 30 of its own


def test_cli_trace_and_flag_errors(fake, tmp_path, capsys):
    path = _write(tmp_path, [{"timestamp": 0, "input_tokens": 4, "output_tokens": 2},
                             {"timestamp": 0.1, "input_tokens": 4, "output_tokens": 2}])
    assert _cli(["bench", "--url", fake.url, "--trace", str(path), "--no-progress", "--slo", "e2e=30s"]) == 0
    out = capsys.readouterr().out
    assert "| trace |" not in out and out.count("\n| run |") == 1 and "trace 10 req/s met (100.0% good)" in out
    bad = _write(tmp_path, ['{"timestamp": 0}'], "bad.jsonl")
    assert _cli(["bench", "--url", fake.url, "--trace", str(bad), "--no-progress"]) == 2
    assert f"{bad}:1: missing input_tokens, output_tokens" in capsys.readouterr().err
    assert _cli(["bench", "--url", fake.url, "--burstiness", "0.5", "--no-progress"]) == 2
    assert "give --rate" in capsys.readouterr().err
    assert _cli(["bench", "--url", fake.url, "--rate", "1", "--arrival", "poisson", "--burstiness", "2"]) == 2
    assert "needs arrival='gamma'" in capsys.readouterr().err
    assert _cli(["bench", "--url", fake.url, "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
