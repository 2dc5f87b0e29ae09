"""Rollout, Serve side: sticky weighted routing (pure), the router's forwarding (in process, fake
versions), and a real rollout under closed-loop load on the embedded Ray (0 failed requests)."""
from __future__ import annotations

import asyncio
import collections
import json
import math

import httpx
import pytest

from llmserve_nb.rollout.routing import EPOCH_HEADER, SERVED_BY_HEADER, RouterConfig, pick_version

SESSIONS = [f"user-{i}" for i in range(4000)]


# ---- sticky weighted choice -------------------------------------------------------------------
def test_pick_is_sticky_and_proportional():
    w = {"a": 70.0, "b": 30.0}
    first = {s: pick_version(w, s) for s in SESSIONS}
    assert all(pick_version(w, s) == v for s, v in first.items())  # same session, same weights: same version
    share_b = sum(v == "b" for v in first.values()) / len(SESSIONS)
    assert share_b == pytest.approx(0.30, abs=0.03)


def test_weight_changes_move_only_the_sessions_they_must():
    prev = {s: pick_version({"a": 100.0, "b": 0.0}, s) for s in SESSIONS}
    assert set(prev.values()) == {"a"}  # weight 0 never chosen
    for wb in (10, 25, 50, 75, 100):
        cur = {s: pick_version({"a": 100.0 - wb, "b": float(wb)}, s) for s in SESSIONS}
        # Raising b's weight only moves sessions a -> b, never back.
        assert not [s for s in SESSIONS if prev[s] == "b" and cur[s] == "a"]
        moved = sum(prev[s] != cur[s] for s in SESSIONS) / len(SESSIONS)
        assert moved <= 0.30  # about the weight change (at most 25 points here), not a reshuffle
        prev = cur
    assert set(prev.values()) == {"b"}


def test_three_versions_unchanged_pair_keeps_its_sessions():
    before = {s: pick_version({"a": 40.0, "b": 40.0, "c": 20.0}, s) for s in SESSIONS}
    after = {s: pick_version({"a": 40.0, "b": 40.0, "c": 40.0}, s) for s in SESSIONS}
    # Only c's weight rose: sessions move to c, never between a and b.
    assert all(after[s] in (before[s], "c") for s in SESSIONS)


def test_no_session_is_random_by_weight_and_exclude_falls_back():
    import random

    rng = random.Random(0)
    counts = collections.Counter(pick_version({"a": 80.0, "b": 20.0}, rng=rng) for _ in range(4000))
    assert counts["b"] / 4000 == pytest.approx(0.2, abs=0.03)
    assert pick_version({"a": 50.0, "b": 50.0}, "s", exclude=["a"]) == "b"
    assert pick_version({"a": 100.0, "b": 0.0}, "s", exclude=["a"]) == "a"  # nothing else takes traffic
    with pytest.raises(ValueError):
        pick_version({"a": 0.0})


def test_router_config_validation():
    v = [{"name": "a", "route_prefix": "/a", "weight": 0}, {"name": "b", "route_prefix": "/a", "weight": 1}]
    with pytest.raises(ValueError, match="prefixes"):
        RouterConfig(versions=v)
    with pytest.raises(ValueError, match="above 0"):
        RouterConfig(versions=[{"name": "a", "route_prefix": "/a", "weight": 0}])
    with pytest.raises(ValueError):
        RouterConfig(versions=[{"name": "a", "route_prefix": "/a", "weight": 101}])


def test_rollout_refuses_a_layout_with_shared_routes():
    from llmserve_nb import AppConfig
    from llmserve_nb.rollout import Rollout, RolloutError

    class FakeCluster:
        serve_url = "http://127.0.0.1:1"

    a = AppConfig(name="a", route_prefix="/a")
    with pytest.raises(RolloutError, match="own route prefix"):
        Rollout(FakeCluster(), stable=a, canary=AppConfig(name="b", route_prefix="/a"))
    with pytest.raises(RolloutError, match="own route prefix"):
        Rollout(FakeCluster(), stable=AppConfig(name="a"), route_prefix="/")  # stable at "/" = the public route
    with pytest.raises(RolloutError, match="distinct application names"):
        Rollout(FakeCluster(), stable=a, name="a", route_prefix="/x")


# ---- the router's forwarding, in process ------------------------------------------------------
def _fake_versions():
    """Two fake versions behind a fake Serve proxy: /a answers normally, /b is used for failures."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    seen = []

    async def handle(request: Request):
        path = request.url.path
        seen.append((path, request.url.query, request.headers.get("x-session-id"), await request.body()))
        if path.startswith("/gone"):  # what Serve's proxy answers for a route it does not have
            return PlainTextResponse(f"Path '{path}' not found. Ping http://.../-/routes for available routes.", 404)
        if path.endswith("/busy"):
            return JSONResponse({"error": {"message": "busy"}}, 429, headers={"retry-after": "2"})
        if path.endswith("/v1/completions"):
            async def sse():
                for tok in ("x", "y"):
                    yield f"data: {json.dumps({'choices': [{'text': tok}]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        return JSONResponse({"path": path, "query": request.url.query}, headers={"x-version-own": "1"})

    return Starlette(routes=[Route("/{p:path}", handle, methods=["GET", "POST"])]), seen


def _router(weights: dict[str, float], prefixes: dict[str, str], upstream_app, broken: set[str] = frozenset()):
    from starlette.requests import Request

    from llmserve_nb.rollout.router import RolloutRouter

    cls = RolloutRouter.func_or_class
    router = cls()
    config = RouterConfig(epoch=7, versions=[{"name": n, "route_prefix": prefixes[n], "weight": w}
                                             for n, w in weights.items()])

    class Transport(httpx.AsyncBaseTransport):
        def __init__(self):
            self.inner = httpx.ASGITransport(upstream_app)

        async def handle_async_request(self, request):
            if any(request.url.path.startswith(p) for p in broken):
                raise httpx.ConnectError("connection refused")
            return await self.inner.handle_async_request(request)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        scope = {**scope, "root_path": "/pub"}
        response = await router(Request(scope, receive))
        await response(scope, receive, send)

    async def setup():
        await router.reconfigure(config.model_dump())
        router.client = httpx.AsyncClient(transport=Transport(), base_url="http://upstream")

    return router, app, setup


def _run(coro):
    return asyncio.run(coro)


def test_router_forwards_path_query_body_headers_and_names_the_version():
    upstream, seen = _fake_versions()
    router, app, setup = _router({"a": 100.0, "b": 0.0}, {"a": "/a", "b": "/b"}, upstream)

    async def go():
        await setup()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            r = await c.post("/pub/v1/models?x=1", content=b"hello", headers={"X-Session-Id": "s1"})
            s = await c.post("/pub/v1/completions", json={"stream": True}, headers={"X-Session-Id": "s1"})
            b = await c.get("/pub/busy")
            st = await c.get("/pub/-/rollout")
        return r, s, b, st

    r, s, b, st = _run(go())
    assert r.status_code == 200 and r.json() == {"path": "/a/v1/models", "query": "x=1"}
    assert r.headers[SERVED_BY_HEADER] == "a" and r.headers[EPOCH_HEADER] == "7" and r.headers["x-version-own"] == "1"
    assert seen[0] == ("/a/v1/models", "x=1", "s1", b"hello")
    assert s.headers["content-type"].startswith("text/event-stream") and s.text.endswith("data: [DONE]\n\n")
    assert b.status_code == 429 and b.headers["retry-after"] == "2"  # status codes and headers preserved
    status = st.json()
    assert status["epoch"] == 7 and status["versions"]["a"]["requests"] == 3
    assert status["versions"]["a"]["in_flight"] == 0 and status["versions"]["a"]["statuses"]["429"] == 1


@pytest.mark.parametrize("failure", ["no_route", "refused"])
def test_router_resends_a_request_no_version_received(failure):
    upstream, seen = _fake_versions()
    prefixes = {"a": "/gone" if failure == "no_route" else "/a", "b": "/b"}
    router, app, setup = _router({"a": 50.0, "b": 50.0}, prefixes, upstream,
                                 broken={"/a"} if failure == "refused" else set())

    async def go():
        await setup()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return [await c.get("/pub/v1/models", headers={"X-Session-Id": f"s{i}"}) for i in range(12)]

    answers = _run(go())
    assert all(r.status_code == 200 and r.headers[SERVED_BY_HEADER] == "b" for r in answers)
    assert router.stats["a"].unreachable > 0 and router.stats["a"].in_flight == 0


# ---- a real rollout under load ----------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout_cluster(cluster):
    # The session's cluster: connect() in this process returns the same embedded Ray, so shutting a
    # second handle down would stop it under every later test.
    return cluster


def _versions():
    from llmserve_nb import AppConfig

    # Two replicas of the embedded model plus the router on 2 cores: half a CPU each, router 0.
    stable = AppConfig(name="ro-v1", route_prefix="/ro-v1").with_overrides(
        **{"deployment.num_cpus": 0.5, "engine.max_tokens_limit": 64})
    canary = stable.with_overrides(name="ro-v2", route_prefix="/ro-v2",
                                   **{"batching.max_batch_size": 4, "engine.max_num_seqs": 8})
    return stable, canary


@pytest.mark.ray
def test_rollout_under_load_drops_nothing(rollout_cluster):
    from llmserve_nb.bench import Workload
    from llmserve_nb.rollout import Rollout, TrafficLoad

    stable, canary = _versions()
    ro = Rollout(rollout_cluster, stable=stable, canary=canary, route_prefix="/ro", name="ro-router", progress=None)
    ro.deploy()
    try:
        cmp = ro.compare(Workload(num_requests=2, output_tokens=4), concurrency=2).summary()
        assert list(cmp["label"]) == ["ro-v1", "ro-v2"] and (cmp["errors"] == 0).all()

        load = TrafficLoad(ro.base_url, Workload(num_requests=32, output_tokens=8, timeout_s=120), concurrency=4,
                           sessions=16)
        ro.on_change = load.mark
        with load:
            load.wait_completed(8)
            load.mark("switch")
            for w in (0, 50):
                ro.shift(w)
                n = load.completed()
                load.wait_completed(n + 12)
            ro.shift(100)
            load.wait_completed(load.completed() + 6)
            ro.promote()
            load.mark("promote done")
            load.wait_completed(load.completed() + 6)
        samples = load.finished()
        phases = load.phases({"before": ("start", "switch"), "during": ("switch", "promote done"),
                              "after": ("promote done", None)})
        print("\nrollout under load:", json.dumps(phases, indent=1))

        assert samples and all(s.status == "ok" for s in samples), [s.error for s in samples if s.status != "ok"][:3]
        assert {s.version for s in samples} == {"ro-v1", "ro-v2"}  # every answer names one of the versions
        assert load.stickiness_violations() == []  # at fixed weights a session stays on its version
        epoch50 = next(h["epoch"] for h in ro.history if h["action"] == "50%")
        at50 = {s.version for s in samples if s.epoch == epoch50}
        assert at50 == {"ro-v1", "ro-v2"}, at50  # 16 sessions at 50 %: both versions serve
        by_session = collections.defaultdict(list)
        for s in sorted(samples, key=lambda s: (s.epoch, s.start_s)):
            by_session[s.session].append(s.version)
        for versions in by_session.values():  # forward shifts only move sessions v1 -> v2, never back
            if "ro-v2" in versions:
                assert "ro-v1" not in versions[versions.index("ro-v2"):], versions
        epoch100 = next(h["epoch"] for h in ro.history if h["action"] == "100%")
        assert all(s.version == "ro-v2" for s in samples if s.epoch >= epoch100)
        assert phases["during"]["failed"] == 0 and not math.isnan(phases["during"]["ttft_ms_p50"])

        st = ro.status()
        assert st["weights"] == {"ro-v2": 100.0} and ro.stable.name == "ro-v2" and ro.canary is None
        apps = rollout_cluster.app_statuses()
        assert "ro-v1" not in apps and apps["ro-v2"].status == "RUNNING"
    finally:
        ro.shutdown()


@pytest.mark.ray
def test_failed_canary_leaves_stable_serving(rollout_cluster):
    from llmserve_nb.rollout import Rollout, RolloutError

    stable, _ = _versions()
    bad = stable.with_overrides(name="ro-bad", route_prefix="/ro-bad", **{"engine.model_source": "/nonexistent/model"})
    ro = Rollout(rollout_cluster, stable=stable, route_prefix="/ro", name="ro-router", progress=None,
                 deploy_timeout_s=300)
    ro.deploy()
    try:
        with pytest.raises(RolloutError) as e:
            ro.deploy(canary=bad)
        msg = str(e.value)
        assert "ro-bad" in msg and "100 %" in msg and "nonexistent" in msg  # Serve's own error is quoted
        assert ro.canary is None and ro.status()["weights"] == {"ro-v1": 100.0}
        assert rollout_cluster.app_status("ro-bad") is None
        r = httpx.post(f"{ro.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200 and r.headers[SERVED_BY_HEADER] == "ro-v1"
    finally:
        ro.shutdown()


def test_phases_and_the_share_plot_read_the_loads_marks():
    """A load's marks (the rollout's weight changes) split it into phases and draw the configured split."""
    import matplotlib

    from llmserve_nb.bench import Event, Timeline
    from llmserve_nb.rollout import Sample, TrafficLoad, plot_traffic_share

    matplotlib.use("Agg")
    load = TrafficLoad("http://127.0.0.1:9")
    marks = [Event(0.0, "start"), Event(2.0, "50%"), Event(4.0, "promoted"), Event(5.0, "stop")]
    load.timeline = Timeline(events=marks, duration_s=6.0, ended=True)
    load.samples = [Sample(i, f"s{i % 2}", start_s=float(i), end_s=i + 0.5, ttft_s=0.1, status="ok",
                           version="a" if i < 3 else "b") for i in range(6)]
    phases = load.phases({"before": ("start", "50%"), "after": ("50%", None)})
    assert phases["before"]["by_version"] == {"a": 2} and phases["after"]["by_version"] == {"a": 1, "b": 3}
    assert phases["after"]["ttft_ms_p50"] == pytest.approx(100.0)
    split = plot_traffic_share(load, bin_s=1.0, versions=["a", "b"]).get_lines()[0]
    # 100 % stable, 50 % from the shift at 2 s, 0 % from the promotion at 4 s to the load's end.
    assert list(split.get_xdata()) == [0.0, 2.0, 4.0, 6.0] and list(split.get_ydata()) == [100.0, 50.0, 0.0, 0.0]
