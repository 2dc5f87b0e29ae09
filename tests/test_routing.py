"""Request routers across replicas: what each `deployment.request_router` renders for both backends and reads
back, the transformers app's prompt ingress (routing key, ASGI replay), and a live check on 2 replicas that
prompts sharing a prefix stay on one replica with the prefix router and spread with Serve's default."""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import ServeDeploySchema
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llmserve_nb.backends import application, config_of_application, get_backend, serve_config
from llmserve_nb.config import DEPLOYMENT_NAME, INGRESS_DEPLOYMENT_NAME, AppConfig, ConfigError
from llmserve_nb.server.router import REPLICA_HEADER, ForwardedRequest, replay, routing_key

ROUTERS = ("power_of_two", "prefix_affinity", "session_affinity")
RAY_CLASSES = {
    "prefix_affinity": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter",
    "session_affinity": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
}


def config(backend: str, router: str, **overrides) -> AppConfig:
    return AppConfig(engine={"backend": backend, "model_source": "org/model"}).with_overrides(
        **{"deployment.request_router": router, "deployment.num_replicas": 2, **overrides})


def entries(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app["deployments"]}


def model_entry(backend: str, app: dict) -> dict:
    cfg = config_of_application(app)
    return entries(app)[get_backend(backend).model_deployment(cfg)]


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
@pytest.mark.parametrize("router", ROUTERS)
def test_each_router_renders_rays_class_on_the_model_deployment_and_round_trips(backend, router):
    cfg = config(backend, router, **{"deployment.max_queued_requests": 9, "deployment.backpressure_status_code": 429})
    app = json.loads(json.dumps(application(cfg)))  # as a YAML file or the REST API carries it
    rendered = model_entry(backend, app).get("request_router_config")
    if router == "power_of_two":
        assert rendered is None  # Serve's default, and Ray Serve LLM's own choice stays
    else:
        assert rendered == {"request_router_class": RAY_CLASSES[router]}
        RequestRouterConfig(**rendered)  # Serve can import it here, in a [serve] environment without pyarrow
    back = config_of_application(app)
    assert back.deployment == cfg.deployment and application(back) == app
    ServeDeploySchema.model_validate(serve_config(cfg))  # what Serve's REST API and `serve deploy` accept


def test_the_transformers_prefix_router_puts_an_ingress_in_front_that_admits_for_the_model():
    cfg = config("transformers", "prefix_affinity", **{"deployment.max_queued_requests": 9})
    app = application(cfg)
    server, ingress = entries(app)[DEPLOYMENT_NAME], entries(app)[INGRESS_DEPLOYMENT_NAME]
    assert app["args"]["deployment"] == {"request_router": "prefix_affinity"}  # build_app adds the ingress
    assert server["max_queued_requests"] == -1  # an inner refusal would be a 500, not backpressure
    assert ingress["max_queued_requests"] == 9 and ingress["backpressure_config"]["status_code"] == 503
    assert ingress["max_ongoing_requests"] == 2 * cfg.max_ongoing_requests and ingress["num_replicas"] == 1
    assert get_backend("transformers").deployment_names(cfg) == [DEPLOYMENT_NAME, INGRESS_DEPLOYMENT_NAME]
    # The routers that do not read the prompt keep one deployment and args without them: in place.
    for router in ("power_of_two", "session_affinity"):
        other = application(cfg.with_overrides(**{"deployment.request_router": router}))
        assert other["args"] == application(AppConfig(engine={"model_source": "org/model"}))["args"]
        assert [d["name"] for d in other["deployments"]] == [DEPLOYMENT_NAME]


def test_build_app_applies_what_the_backend_renders():
    """`serve run ...:build_app deployment.request_router=prefix_affinity` and a Serve config deploy agree."""
    from llmserve_nb.server.app import build_app

    cfg = config("transformers", "prefix_affinity")
    app = application(cfg)
    ingress = build_app(app["args"] | {"deployment": {"request_router": "prefix_affinity", "num_replicas": 2}})
    assert ingress._bound_deployment.name == INGRESS_DEPLOYMENT_NAME
    (server,) = ingress._bound_deployment.init_args
    dc = server._bound_deployment._deployment_config
    assert server._bound_deployment.name == DEPLOYMENT_NAME and dc.max_queued_requests == -1
    assert dc.request_router_config.request_router_class == RAY_CLASSES["prefix_affinity"]
    assert server._bound_deployment.init_args == (app["args"],)
    idc = ingress._bound_deployment._deployment_config
    want = entries(app)[INGRESS_DEPLOYMENT_NAME]
    assert (idc.max_ongoing_requests, idc.max_queued_requests) == (want["max_ongoing_requests"], want["max_queued_requests"])


def test_a_router_llmserve_does_not_render_is_refused_not_dropped():
    app = application(config("vllm", "prefix_affinity"))
    server = model_entry("vllm", app)
    server["request_router_config"] = {"request_router_class": "my.module:MyRouter"}
    with pytest.raises(ConfigError, match="my.module:MyRouter"):
        config_of_application(app)
    # Ray's spellings of the same routers read back as them.
    server["request_router_config"] = {"request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter"}
    assert config_of_application(app).deployment.request_router == "prefix_affinity"
    server["request_router_config"] = {
        "request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
    assert config_of_application(app).deployment.request_router == "power_of_two"


@pytest.mark.parametrize("body, key", [
    (b'{"prompt": "Once upon", "max_tokens": 4}', {"prompt": "Once upon"}),
    (b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}', {"messages": [{"role": "user", "content": "hi"}]}),
    (b'{"prompt": ""}', None),
    (b'{"max_tokens": 4}', None),
    (b"[1, 2]", None),
    (b"not json", None),
    (b"", None),
])
def test_routing_key_exposes_one_field_the_router_reads(body, key):
    got = routing_key(body)
    assert (None if got is None else vars(got)) == key


def _asgi_app(seen: dict) -> Starlette:
    async def echo(request):
        return JSONResponse({"path": request.url.path, "body": (await request.json())["x"]}, status_code=201)

    async def stream(request):
        async def chunks():
            try:
                for i in range(1000):
                    yield f"chunk {i}\n"
                    await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise

        return StreamingResponse(chunks())

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)])


def _scope(method: str, path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}


def test_replay_runs_a_request_through_the_app_and_stops_it_when_closed_early():
    seen: dict = {}
    app = _asgi_app(seen)

    async def run():
        out = [m async for batch in replay(app, ForwardedRequest(_scope("POST", "/echo"), b'{"x": 7}')) for m in batch]
        gen = replay(app, ForwardedRequest(_scope("GET", "/stream"), b""))
        first = await gen.__anext__()
        batches = [first]
        while sum(m["type"] == "http.response.body" for b in batches for m in b) < 5:
            batches.append(await gen.__anext__())
        await gen.aclose()  # the client went away
        return out, batches

    out, batches = asyncio.run(run())
    assert out[0]["type"] == "http.response.start" and out[0]["status"] == 201
    assert json.loads(b"".join(m.get("body", b"") for m in out[1:])) == {"path": "/echo", "body": 7}
    assert batches[0][0]["status"] == 200
    assert seen.get("cancelled") is True


# ---- live: 2 replicas on the embedded Ray ------------------------------------------------------
PREFIXES = [f"Story {i}:" + " the old king walked to the river and sat by the water" * 6 for i in range(3)]


def _replicas_of(app, prompts: list[str], headers: dict[str, str] | None = None) -> list[str]:
    with httpx.Client(base_url=app.base_url, timeout=60, headers=headers) as client:
        out = []
        for prompt in prompts:
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            out.append(r.headers[REPLICA_HEADER])
        return out


# A quarter CPU a replica: the two apps below (4 replicas) fit the embedded Ray's 2 CPUs beside the session's
# `app` (1 CPU), which the suite keeps running; at half a CPU the second app waited for CPUs that never freed.
LIVE = AppConfig(name="spread", route_prefix="/spread", engine={"torch_threads": 1, "max_tokens_limit": 8},
                 deployment={"num_replicas": 2, "num_cpus": 0.25})


@pytest.mark.ray
def test_prefix_router_keeps_a_prefix_on_one_replica_and_the_default_spreads(cluster):
    prefix = LIVE.with_overrides(**{"name": "affinity", "route_prefix": "/affinity",
                                    "deployment.request_router": "prefix_affinity"})
    # Both apps at once (4 replicas of a quarter CPU): their model loads overlap.
    apps = [cluster.deploy(cfg, wait=False, progress=None) for cfg in (LIVE, prefix)]
    try:
        for app in apps:
            app.wait_running(timeout_s=300, progress=None)
        spread = _replicas_of(apps[0], [PREFIXES[0] + f" part {i}" for i in range(12)])
        assert len(set(spread)) == 2, Counter(spread)  # all 12 on one replica: p = 2^-11

        app = apps[1]
        prompts = [PREFIXES[i % 3] + f" part {i}" for i in range(12)]
        routed = _replicas_of(app, prompts)
        by_prefix = {p: {r for q, r in zip(prompts, routed) if q.startswith(p)} for p in PREFIXES}
        assert all(len(replicas) == 1 for replicas in by_prefix.values()), by_prefix
        assert len(set(routed)) == 2, Counter(routed)  # a new prefix goes to the replica holding the least
        # Streaming and a prompt-less GET go through the ingress too.
        with httpx.stream("POST", f"{app.base_url}/v1/completions", timeout=60,
                          json={"prompt": PREFIXES[0], "max_tokens": 3, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.headers[REPLICA_HEADER] in by_prefix[PREFIXES[0]] and lines[-1] == "data: [DONE]"
        assert httpx.get(f"{app.base_url}/stats", timeout=30).json()["replica"] in set(routed)
    finally:
        for app in apps:
            app.shutdown()


@pytest.mark.ray
def test_session_router_keeps_a_session_on_one_replica(cluster):
    app = cluster.deploy(LIVE.with_overrides(**{"name": "session", "route_prefix": "/session",
                                                "deployment.request_router": "session_affinity"}), progress=None)
    try:
        sessions = {s: _replicas_of(app, [PREFIXES[0]] * 4, {"x-session-id": s}) for s in "abcdefgh"}
        assert all(len(set(r)) == 1 for r in sessions.values()), sessions
        assert len({r[0] for r in sessions.values()}) == 2, sessions  # 8 sessions on one replica: p = 2^-7
    finally:
        app.shutdown()


# ---- the tuner ---------------------------------------------------------------------------------
def test_the_tuner_shows_the_router_and_declines_to_change_it_in_place():
    from llmserve_nb import AppHandle, Cluster
    from llmserve_nb.widgets import ServeTuner

    class Recording(Cluster):
        def __init__(self):
            super().__init__("http://127.0.0.1:9", "http://127.0.0.1:9", kind="address", how="test")
            self.sent: list[dict] = []

        def serve_details(self):
            return {"applications": {"llm": {"status": "RUNNING", "deployments": {DEPLOYMENT_NAME: {
                "status": "HEALTHY", "target_num_replicas": 2,
                "replicas": [{"replica_id": r, "state": "RUNNING"} for r in ("r1", "r2")]}}}}}

        def deploy_application(self, application: dict) -> None:
            self.sent.append(application)

    cluster = Recording()
    app = AppHandle(cluster, AppConfig(deployment={"num_replicas": 2, "request_router": "session_affinity"}))
    app.wait_running = lambda **kw: None  # the fake Serve never echoes a config back
    t = ServeTuner(app)
    assert "router session_affinity" in t.status.value and t.request_router in t.widget.children
    t.set(max_batch_size=4)
    t.apply()  # other knobs still apply, with the router the app has
    (sent,) = cluster.sent
    assert sent["deployments"][0]["request_router_config"]["request_router_class"] == RAY_CLASSES["session_affinity"]
    t.set(request_router="prefix_affinity")
    assert "delete the app" in t.status.value
    t.apply()
    assert len(cluster.sent) == 1 and "session_affinity → prefix_affinity" in t.notes[-1]
