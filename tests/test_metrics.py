"""The server's metrics: the recorder on its own, then through a real Ray and a real Prometheus.

The integration test deploys a small fake LLM server that records exactly as `llmserve_nb.server.app` does
(request -> admission batch -> tokens -> finish, plus the `with` safety net), so it tests the metrics
path without loading a model, and asserts on PromQL answers, not on exposition text.
"""
from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from llmserve_nb.config import DEPLOYMENT_NAME
from llmserve_nb.observability.promql import METRIC_NAMES, PROMQL, queries
from llmserve_nb.server.metrics import ServerMetrics
from prometheus_server import prometheus  # noqa: F401  (the fixture)

STATS_KEYS = {"batches", "requests", "batch_size_histogram", "max_batch_size_seen", "mean_batch_size",
              "generated_tokens", "mean_queue_wait_s"}


# ---- the recorder, outside Serve ----------------------------------------------------------------
def test_lifecycle_and_stats():
    m = ServerMetrics("tiny")
    recs = [m.request("/v1/completions") for _ in range(3)]
    assert (m.running, m.waiting) == (0, 3)
    m.admission_batch(recs[:2])
    assert (m.running, m.waiting) == (2, 1)
    m.admission_batch(recs[2:])
    for r in recs:
        r.tokens(2)
        r.tokens(3)
    recs[0].finish(200, "stop", prompt_tokens=7, completion_tokens=5)
    recs[1].finish(200, "length", prompt_tokens=7, completion_tokens=9)  # 4 tokens never reported: counted once
    recs[2].finish(200, "stop", prompt_tokens=7, completion_tokens=5)
    recs[2].finish(500, "error")  # a second finish is ignored
    assert (m.running, m.waiting) == (0, 0)
    stats = m.as_stats()
    assert set(stats) == STATS_KEYS
    assert stats["batches"] == 2 and stats["requests"] == 3
    assert stats["batch_size_histogram"] == {"1": 1, "2": 1}
    assert stats["max_batch_size_seen"] == 2 and stats["mean_batch_size"] == 1.5
    assert stats["generated_tokens"] == 5 + 9 + 5
    assert stats["mean_queue_wait_s"] < 1  # admitted as soon as they arrived


def test_a_request_with_several_prompts_is_one_request_of_several_jobs():
    m = ServerMetrics("tiny")
    rec = m.request("/v1/completions")
    m.admission_batch([rec, rec])
    m.admission_batch([rec])
    assert (m.running, m.waiting) == (1, 0)
    rec.finish(200, "stop", prompt_tokens=9, completion_tokens=6)
    stats = m.as_stats()
    assert stats["requests"] == 3 and stats["batch_size_histogram"] == {"1": 1, "2": 1}
    assert (m.running, m.waiting) == (0, 0)


def test_engine_state_splits_admitted_requests_and_cannot_outlive_them():
    engine = {"num_requests_running": 0, "kv_cache_usage_perc": 0.0}
    m = ServerMetrics("tiny", engine_stats=lambda: engine)
    recs = [m.request("/v1/completions") for _ in range(4)]
    engine["num_requests_running"] = 1  # of the 3 admitted below, the engine decodes 1, queues 2
    m.admission_batch(recs[:3])
    assert (m.running, m.waiting) == (1, 3)
    engine["num_requests_running"] = 7  # an engine that lags behind the requests that left
    for r in recs:
        r.finish(200, "stop", 1, 1)
    assert (m.running, m.waiting) == (0, 0)


def test_rejected_requests_never_count_as_running():
    m = ServerMetrics("tiny")
    m.request("/v1/chat/completions").finish(400)  # rejected at validation: no finished_reason
    with pytest.raises(ValueError, match="finished_reason"):
        m.request("/generate").finish(200, "done")  # type: ignore[arg-type]
    assert (m.running, m.waiting) == (0, 1)  # the misused record is still open...
    assert m.as_stats()["requests"] == 0


def test_context_manager_finishes_what_the_handler_did_not():
    class HTTPish(Exception):
        status = 503

    m = ServerMetrics("tiny")
    with pytest.raises(HTTPish):
        with m.request("/v1/completions") as rec:
            m.admission_batch([rec])
            raise HTTPish()
    assert rec.finished
    with pytest.raises(asyncio.CancelledError):  # a client that went away mid-stream
        with m.request("/v1/completions") as rec:
            m.admission_batch([rec])
            rec.tokens(4)
            raise asyncio.CancelledError()
    with m.request("/v1/completions") as rec:
        pass  # the route returned a stream: the record lives on
    assert not rec.finished and m.waiting == 1
    with rec:
        m.admission_batch([rec])
        rec.finish(200, "stop", 3, 0)
    assert (m.running, m.waiting) == (0, 0)
    assert m.as_stats()["generated_tokens"] == 4


def test_tokens_from_another_thread():
    m = ServerMetrics("tiny")
    rec = m.request("/v1/completions")
    m.admission_batch([rec])
    threads = [threading.Thread(target=lambda: [rec.tokens(1) for _ in range(500)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec.finish(200, "length", 1, 2000)
    assert m.as_stats()["generated_tokens"] == 2000


def test_queries_name_only_exported_metrics():
    assert all(name.startswith("ray_llmserve_") for name in METRIC_NAMES)
    assert {n for n, kind in METRIC_NAMES.items() if kind == "counter"} == {
        f"ray_llmserve_{n}_total" for n in ("prompt_tokens", "generation_tokens", "request_success", "http_requests")}
    scoped = queries(window="30s", selector='application="x"')
    assert scoped.keys() == PROMQL.keys()
    for key, promql in scoped.items():
        assert 'application="x"' in promql, key
        assert "[1m]" not in promql, key
    used = " ".join(PROMQL.values())
    for name, kind in METRIC_NAMES.items():
        if name.endswith("admission_batch_size") or name.endswith(("prompt_tokens_total", "request_success_total")):
            continue  # dashboard panels, not part of the canonical figures
        assert (f"{name}_bucket" if kind == "histogram" else name) in used, name


# ---- a fake LLM server recording as server.app does ----------------------------------------------
APP = "metrics-probe"
MODEL = "fake-llm"
TOKEN_S = 0.02


def fake_llm_app(model_name: str = MODEL):
    """A Serve app shaped like LLMServer (same deployment name) with a sleep instead of a model.

    Defined inside a function so cloudpickle ships the class by value: workers cannot import tests/."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from llmserve_nb.server.metrics import ServerMetrics

    class ServerError(Exception):
        status = 500

    @serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0})
    class FakeLLM:
        def __init__(self):
            self.decoding = 0  # the fake engine's decode rows
            self.metrics = ServerMetrics(model_name, engine_stats=lambda: {
                "num_requests_running": self.decoding, "kv_cache_usage_perc": self.decoding / 32})

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def admit(self, records):
            self.metrics.admission_batch(records)
            await asyncio.sleep(TOKEN_S)  # the batch's prefill
            return [None] * len(records)

        async def __call__(self, request: Request):
            path = request.url.path.removeprefix(request.scope.get("root_path", ""))
            if path == "/stats":
                return self.metrics.as_stats()
            body = await request.json()
            try:
                with self.metrics.request(path) as rec:
                    if not body.get("prompt"):
                        rec.finish(400)
                        return JSONResponse({"error": "prompt is required"}, status_code=400)
                    await self.admit(rec)
                    n = int(body.get("max_tokens", 16))
                    self.decoding += 1
                    try:
                        for _ in range(n):
                            rec.tokens(1)
                            await asyncio.sleep(TOKEN_S)
                    finally:
                        self.decoding -= 1
                    if body.get("fail"):
                        raise ServerError("engine failed")  # the `with` records it: 500, "error"
                    rec.finish(200, "length", prompt_tokens=len(body["prompt"].split()), completion_tokens=n)
                    return {"text": "x" * n}
            except ServerError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)

    return FakeLLM.bind()


@contextmanager
def deployed_fake_llm(cluster, app_name: str) -> Iterator[str]:
    """Deploy the fake server as application `app_name` on the session's Ray; yield its base URL."""
    from ray import serve

    port = urlparse(cluster.serve_url).port
    # Serve may not be running yet on this cluster: start it on the cluster's port, not Serve's 8000.
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(fake_llm_app(), name=app_name, route_prefix=f"/{app_name}", blocking=False)
    deadline = time.monotonic() + 120
    url = f"{cluster.serve_url}/{app_name}"
    while True:
        try:
            if httpx.get(f"{url}/stats", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}/stats did not answer within 120s")
        time.sleep(0.5)
    try:
        yield url
    finally:
        serve.delete(app_name)


def drive_load(url: str, duration_s: float, concurrency: int = 6, seed: int = 0) -> dict[int, int]:
    """Closed-loop load for `duration_s`: mostly good requests, some 400s and 500s. Returns status counts."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def worker(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop_at:
                roll = rng.random()
                body = {"prompt": "tell me a story", "max_tokens": rng.randint(4, 24)}
                if roll < 0.08:
                    body["prompt"] = ""
                elif roll < 0.15:
                    body["fail"] = True
                status = client.post(f"{url}/v1/completions", json=body).status_code
                with lock:
                    counts[status] = counts.get(status, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


@pytest.fixture(scope="module")
def fake_llm(cluster):
    with deployed_fake_llm(cluster, APP) as url:
        yield url


# ---- through Ray's endpoint into a real Prometheus ----------------------------------------------
@pytest.mark.ray
def test_metrics_reach_prometheus(prometheus, fake_llm):  # noqa: F811
    sel = f'application="{APP}"'
    q = queries(window="30s", selector=sel)
    loader = threading.Thread(target=lambda: counts.update(drive_load(fake_llm, 25.0)))
    counts: dict[int, int] = {}
    loader.start()
    try:
        # Ray reports every 10 s; Prometheus scrapes every second.
        prometheus.wait_for(q["generation_tokens_per_s"], lambda v: v > 0, timeout_s=45)
        running_seen = prometheus.wait_for(
            f"max_over_time(({q['requests_running']})[60s:1s])", lambda v: v > 0, timeout_s=30)
    finally:
        loader.join()
    assert counts.get(200, 0) > 20 and counts.get(400, 0) > 0 and counts.get(500, 0) > 0, counts
    assert running_seen <= 32  # max_ongoing_requests

    # Every exported name, with Serve's labels and ours.
    found = {s["metric"]["__name__"]: s["metric"] for s in prometheus.query(f'{{__name__=~"ray_llmserve_.+",{sel}}}')}
    for name, kind in METRIC_NAMES.items():
        exported = f"{name}_bucket" if kind == "histogram" else name
        assert exported in found, f"{exported} not in Prometheus; found {sorted(found)}"
        labels = found[exported]
        assert labels["model_name"] == MODEL and labels["deployment"] == DEPLOYMENT_NAME and labels["replica"]
    reasons = {s["metric"]["finished_reason"] for s in prometheus.query(f"ray_llmserve_request_success_total{{{sel}}}")}
    assert reasons == {"length", "error"}
    statuses = {s["metric"]["status"] for s in prometheus.query(f"ray_llmserve_http_requests_total{{{sel}}}")}
    assert statuses == {"200", "400", "500"}

    # The canonical queries: all parse, and answer sanely.
    values = {k: prometheus.value(promql) for k, promql in q.items()}
    assert values["requests_per_s"] > 0 and values["errors_per_s"] > 0, values
    assert 0 < values["error_ratio"] < 0.5, values
    # Each request waits for its admission batch and a prefill step before its first token.
    assert 0 < values["ttft_p50_s"] <= values["ttft_p99_s"] < 5, values
    assert math.isfinite(values["e2e_p99_s"]), values
    # A sleep of TOKEN_S per token; histogram interpolation within vLLM's 0.01/0.025/0.05 buckets.
    assert TOKEN_S / 2 < values["tpot_p50_s"] < 0.05, values
    assert values["replicas_target"] == 1 and values["replicas_running"] == 1, values
    assert values["kv_cache_usage"] <= 1, values  # a fraction, as vLLM's gauge, not a percentage
    assert prometheus.value(f"max_over_time(({q['kv_cache_usage']})[60s:1s])") > 0

    # /stats is the same bookkeeping: once Ray has reported the last of it, the totals agree.
    stats = httpx.get(f"{fake_llm}/stats", timeout=10).json()
    assert stats["requests"] == counts[200] + counts[500], (stats, counts)
    assert stats["max_batch_size_seen"] > 1, stats  # concurrent requests did share admission batches
    prometheus.wait_for(f"sum(ray_llmserve_generation_tokens_total{{{sel}}})",
                        lambda v: v == stats["generated_tokens"], timeout_s=30)
    prometheus.wait_for(f"sum(ray_llmserve_admission_batch_size_count{{{sel}}})",
                        lambda v: v == stats["batches"], timeout_s=30)
    prometheus.wait_for(f"sum(ray_llmserve_num_requests_running{{{sel}}}) + "
                        f"sum(ray_llmserve_num_requests_waiting{{{sel}}})", lambda v: v == 0, timeout_s=30)
