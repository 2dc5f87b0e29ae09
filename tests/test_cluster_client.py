"""The client side of llmserve_nb.cluster: connect targets, tokens, timeouts, errors, shutdown, update detection.

Most tests here run against FAKES on localhost, not Ray: `FakeDashboard` answers the few Ray dashboard
REST routes the client uses (`/api/version`, `/api/serve/applications/` GET/PUT/DELETE, `/api/packages/gcs/`
GET/PUT) with a tiny in-memory Serve state and package store, and `FakeApp` plays the Serve proxy of one
app (answering, hanging, or 503).
Where a test only needs set answers, `httpx.MockTransport` stands in for both, passed as `transport=`.
They pin the client's behaviour where real Ray cannot be made to misbehave on demand. The tests marked
`ray` at the end run on the real embedded Ray of the test session.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from llmserve_nb import AppConfig, ClusterError, DeployError, connect
from llmserve_nb.backends import application
from llmserve_nb.cluster import AppHandle, Cluster, check_version_skew, read_ray_token
from llmserve_nb.cluster.status import AppStatus
from llmserve_nb.config import DEPLOYMENT_NAME


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose handler calls `self.handle(method, path, headers, body)`."""

    def __init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw and "json" in (self.headers.get("content-type") or "") else raw or None
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = outer.handle(self.command, self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.requests: list[tuple[str, str, dict, Any]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeDashboard(_Server):
    """A FAKE Ray dashboard: version, bearer-token check, and Serve applications kept in memory.

    A PUT replaces the applications; each comes up as `put_status` (with `put_message`), and Serve's echo of
    the new config (`deployed_app_config`) appears only `apply_delay_s` after the PUT, as a busy controller's would.
    """

    def __init__(self, ray_version: str | None = None, token: str | None = None) -> None:
        import ray

        self.ray_version = ray_version or ray.__version__
        self.token = token
        self.apps: dict[str, dict[str, Any]] = {}
        self.packages: dict[str, bytes] = {}  # what PUT /api/packages/gcs/<name> stored
        self.put_status, self.put_message, self.apply_delay_s = "RUNNING", "", 0.0
        self._pending: list[tuple[float, dict[str, Any]]] = []
        super().__init__()

    def add_app(self, app_entry: dict[str, Any], status: str = "RUNNING", message: str = "", replicas: int = 1) -> None:
        deployments = {
            d["name"]: {"status": "HEALTHY" if replicas else "UNHEALTHY", "message": "",
                        "replicas": [{"state": "RUNNING"}] * replicas, "deployment_config": d}
            for d in app_entry.get("deployments") or []
        }
        self.apps[app_entry["name"]] = {"status": status, "message": message, "deployed_app_config": app_entry,
                                        "route_prefix": app_entry.get("route_prefix"), "deployments": deployments}

    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "unauthenticated"}
        if path == "/api/version":
            return 200, {"ray_version": self.ray_version, "version": "4"}
        if path.startswith("/api/packages/gcs/"):
            name = path.removeprefix("/api/packages/gcs/")
            if method == "PUT":
                self.packages[name] = body
                return 200, {}
            return (200, {}) if name in self.packages else (404, {"error": f"Package gcs://{name} does not exist"})
        if path != "/api/serve/applications/":
            return 404, {"error": path}
        now = time.monotonic()
        if method == "PUT":
            self._pending.append((now + self.apply_delay_s, body))
            if not self.apply_delay_s:
                self._apply(body)
                self._pending.clear()
            return 200, {}
        if method == "DELETE":
            self.apps.clear()
            return 200, {}
        for due, pending in [p for p in self._pending if p[0] <= now]:
            self._apply(pending)
            self._pending.remove((due, pending))
        return 200, {"http_options": {"host": "127.0.0.1", "port": 8000}, "applications": self.apps}

    def _apply(self, body: dict[str, Any]) -> None:
        before = self.apps
        self.apps = {}
        for entry in body["applications"]:
            if before.get(entry["name"], {}).get("deployed_app_config") == entry:
                self.apps[entry["name"]] = before[entry["name"]]
            else:
                self.add_app(entry, self.put_status, self.put_message, replicas=int(self.put_status == "RUNNING"))


class FakeApp(_Server):
    """A FAKE Serve proxy for one app: `mode` is "ok" (answers like our app), "hang" or "503"."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        super().__init__()

    def handle(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        if self.mode == "hang":
            time.sleep(30)
        if self.mode == "503":
            return 503, {"error": {"message": "Service Unavailable"}}
        if path == "/v1/chat/completions":
            return 200, {"choices": [{"message": {"content": "Paris"}}]}
        return 200, {"ok": True}


@pytest.fixture()
def dashboard():
    server = FakeDashboard()
    yield server
    server.stop()


@pytest.fixture()
def fake_app():
    server = FakeApp()
    yield server
    server.stop()


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sent_tokens(server: _Server) -> list[str | None]:
    return [h.get("Authorization") or h.get("authorization") for _, _, h, _ in server.requests]


# ---- tokens and targets -------------------------------------------------------------------

def test_ray_token_is_read_env_then_path_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_ray_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert read_ray_token() == "from-home"
    (tmp_path / "elsewhere").write_text(" from-path ")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert read_ray_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_ray_token() == "from-env"


def test_connect_address_sends_the_explicit_token_before_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    server = FakeDashboard(token="explicit")
    try:
        cluster = connect(address=server.url, token="explicit")
        assert cluster.kind == "address" and cluster.serve_url == "http://127.0.0.1:8000"
        with pytest.raises(ClusterError, match=rf"dashboard at {server.url} rejected our credentials \(HTTP 401\)"):
            connect(address=server.url)  # $RAY_AUTH_TOKEN is the wrong one here
        server.token = "from-env"
        connect(target="address", address=server.url, serve_url="http://127.0.0.1:18000").shutdown()
        assert _sent_tokens(server)[0] == "Bearer explicit" and _sent_tokens(server)[-1] == "Bearer from-env"
    finally:
        server.stop()


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "kuberay"}, r"target='kuberay' needs kuberay="),
    ({"target": "kuberay", "address": "http://h:8265"}, r"target='kuberay' needs kuberay="),
    ({"target": "address"}, r"target='address' needs address="),
    ({"target": "address", "kuberay": "llm"}, r"target='address' needs address="),
    ({"target": "cloud"}, r"target='cloud': use 'local', 'address' or 'kuberay'"),
    ({"address": "http://h:8265", "kuberay": "llm"}, r"either address= or kuberay=, not both"),
    ({"target": "address", "address": "ftp://h"}, r"use http\(s\)://host:8265"),
])
def test_connect_refuses_a_wrong_combination(kwargs, message):
    with pytest.raises(ClusterError, match=message):
        connect(**kwargs)


def test_connect_with_a_target_ignores_the_other_targets_arguments(dashboard):
    cluster = connect(target="address", address=dashboard.url, kuberay="llm-notebook", namespace="llmserve", token=None)
    assert cluster.kind == "address" and cluster.dashboard_url == dashboard.url
    cluster.shutdown()


# ---- version skew ---------------------------------------------------------------------------

def test_version_skew_names_both_versions_and_the_fix():
    check_version_skew("2.60.0", "3.11", local_ray="2.60.0", local_python="3.11.7")
    check_version_skew(None, None, local_ray="2.60.0", local_python="3.11.7")
    with pytest.raises(ClusterError, match=(
        r"the cluster runs ray 2\.59\.1, this kernel has ray 2\.60\.0; the cluster runs Python 3\.10, "
        r"this kernel has Python 3\.11\.7\. Install .*pip install ray\[serve\]==2\.59\.1` on Python 3\.10"
    )):
        check_version_skew("2.59.1", "3.10", local_ray="2.60.0", local_python="3.11.7")


def test_connect_address_refuses_the_dashboards_other_ray_version():
    server = FakeDashboard(ray_version="2.9.3")
    try:
        with pytest.raises(ClusterError, match=r"the cluster runs ray 2\.9\.3, this kernel has ray"):
            connect(address=server.url)
        connect(address=server.url, check_version=False).shutdown()
    finally:
        server.stop()


# ---- transport errors and timeouts ----------------------------------------------------------

def test_dashboard_that_does_not_answer_is_a_timeout_error_with_its_url(fake_app):
    fake_app.mode = "hang"
    cluster = Cluster(fake_app.url, fake_app.url, kind="address", how="test", timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=rf"GET {fake_app.url}/api/version: the Ray dashboard did not answer"):
        cluster.version()
    assert time.monotonic() - t0 < 5


def test_app_that_hangs_fails_fast_with_serves_status(dashboard, fake_app):
    fake_app.mode = "hang"
    config = AppConfig()
    dashboard.add_app(application(config), status="DEPLOY_FAILED", replicas=0,
                      message="The deployment failed to start 3 times in a row. OSError: /nonexistent is not a model")
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = AppHandle(cluster, config, request_timeout_s=0.5)
    for call in (lambda: handle.chat("hi"), lambda: handle.complete("hi"), lambda: list(handle.stream_chat("hi")),
                 handle.stats):
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err:
            call()
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert f"{fake_app.url}/" in msg and "no answer within request_timeout_s=0.5s" in msg, msg
        assert "Serve reports application 'llm' DEPLOY_FAILED with 0 running replica(s)" in msg, msg
        assert "/nonexistent is not a model" in msg, msg


def test_app_answering_503_names_the_status_and_a_running_app_hints_at_the_timeout(dashboard, fake_app):
    fake_app.mode = "503"
    config = AppConfig()
    dashboard.add_app(application(config), status="DEPLOYING", replicas=0, message="Deploying new version.")
    handle = AppHandle(Cluster(dashboard.url, fake_app.url, kind="address", how="test"), config)
    with pytest.raises(ClusterError, match=r"HTTP 503: Service Unavailable\. Serve reports application 'llm' "
                                           r"DEPLOYING with 0 running replica\(s\): Deploying new version\."):
        handle.chat("hi")
    fake_app.mode = "hang"
    dashboard.add_app(application(config), status="RUNNING", replicas=1)
    handle.request_timeout_s = 0.3
    with pytest.raises(ClusterError, match=r"RUNNING with 1 running replica\(s\): the app looks healthy: .*"
                                           r"more than request_timeout_s=0\.3"):
        handle.chat("hi")


def test_app_behind_a_dead_port_names_the_proxy_and_the_dashboard_state():
    dead = f"http://127.0.0.1:{_dead_port()}"
    handle = AppHandle(Cluster(dead, dead, kind="address", how="test"), AppConfig())
    with pytest.raises(ClusterError, match=(
        rf"POST {dead}/v1/chat/completions: cannot reach the Serve proxy \(ConnectError.*"
        rf"Serve's status of 'llm' is unknown as well: cannot reach the Ray dashboard at {dead}"
    )):
        handle.chat("hi")


# ---- deploy, update, shutdown --------------------------------------------------------------

def _ours(name: str, route: str) -> AppConfig:
    return AppConfig(name=name, route_prefix=route)


def test_shutdown_deletes_only_the_apps_this_session_deployed(dashboard, fake_app):
    theirs = _ours("theirs", "/theirs")
    dashboard.add_app(application(theirs))
    closed: list[str] = []
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test", on_close=lambda: closed.append("x"))
    attached = cluster.app("theirs")
    assert attached.config.name == "theirs" and cluster.deployed == set()
    cluster.deploy(_ours("mine", "/mine"), progress=None)
    assert set(dashboard.apps) == {"theirs", "mine"} and cluster.deployed == {"mine"}
    cluster.shutdown()
    assert set(dashboard.apps) == {"theirs"} and closed == ["x"]
    assert not [r for r in dashboard.requests if r[0] == "DELETE"]
    cluster.close()
    assert closed == ["x"]


def test_close_keeps_every_app_and_stops_what_the_cluster_started(dashboard, fake_app):
    closed: list[str] = []
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test", on_close=lambda: closed.append("x"))
    cluster.deploy(_ours("mine", "/mine"), progress=None)
    sent = len(dashboard.requests)
    cluster.close()
    assert set(dashboard.apps) == {"mine"} and closed == ["x"]
    assert len(dashboard.requests) == sent


def test_an_app_a_rayservice_owns_is_never_deleted(dashboard, fake_app):
    dashboard.add_app(application(AppConfig()))
    cluster = Cluster(dashboard.url, fake_app.url, kind="kuberay", how="test")
    cluster.managed_by = "llm-service"
    handle = cluster.app("llm")
    with pytest.raises(DeployError, match=r"cannot delete 'llm': this cluster belongs to RayService 'llm-service'"):
        handle.shutdown()
    cluster.deployed.add("llm")  # even a name recorded as ours is left to the RayService
    cluster.shutdown()
    assert set(dashboard.apps) == {"llm"}
    assert not [r for r in dashboard.requests if r[0] in ("PUT", "DELETE")]


def test_update_failing_in_serve_is_a_deploy_error_with_serves_message(dashboard, fake_app):
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.deploy(AppConfig(), progress=None)
    dashboard.put_status = "DEPLOY_FAILED"
    dashboard.put_message = "Failed to update the deployments ['LLMServer']. OSError: /nonexistent is not a model"
    with pytest.raises(DeployError, match=r"application 'llm' is DEPLOY_FAILED: Failed to update.*/nonexistent"):
        handle.update(AppConfig().with_overrides(**{"engine.model_source": "/nonexistent"}), timeout_s=10)


def test_update_of_autoscaling_only_waits_until_serve_echoes_it(dashboard, fake_app):
    base = AppConfig().with_overrides(**{"deployment.autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.deploy(base, progress=None)
    dashboard.apply_delay_s = 1.5
    new = base.with_overrides(**{"deployment.autoscaling.max_replicas": 3})
    t0 = time.monotonic()
    handle.update(new, timeout_s=20)
    assert time.monotonic() - t0 >= 1.5, "update returned before Serve reported the new autoscaling config"
    echoed = dashboard.apps["llm"]["deployed_app_config"]["deployments"][0]["autoscaling_config"]
    assert echoed["max_replicas"] == 3


def test_a_change_of_request_router_deletes_the_app_first_and_other_updates_stay_in_place(dashboard, fake_app):
    # Serve 2.60 keeps a deployment's router through in-place updates (see Cluster.deploy_application).
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.deploy(AppConfig(), progress=None)

    def puts() -> list[list[str]]:
        return [[a["name"] for a in body["applications"]] for method, path, body in
                ((r[0], r[1], r[-1]) for r in dashboard.requests) if method == "PUT" and path.startswith("/api/serve")]

    handle.update(AppConfig().with_overrides(**{"batching.max_batch_size": 4}), timeout_s=10)
    assert puts() == [["llm"], ["llm"]]  # batching: one PUT, in place
    handle.update(AppConfig().with_overrides(**{"deployment.request_router": "prefix_affinity"}), timeout_s=10)
    assert puts() == [["llm"], ["llm"], [], ["llm"]]  # the router: the app removed, then deployed afresh
    deployed = dashboard.apps["llm"]["deployed_app_config"]["deployments"]
    assert any(d.get("request_router_config") for d in deployed)


def test_status_runs_compares_args_and_every_key_of_our_deployment_entry():
    config = AppConfig().with_overrides(**{"deployment.autoscaling": {"min_replicas": 1, "max_replicas": 2}})

    def echo(app: dict) -> AppStatus:
        return AppStatus.parse("llm", {"status": "RUNNING", "deployed_app_config": app})

    want = application(config)
    assert echo(want).runs(want)
    # Serve's schema turns whole numbers into floats and adds keys of its own; neither makes it stale.
    entry = next(d for d in want["deployments"] if d["name"] == DEPLOYMENT_NAME)
    floats = {**entry, "autoscaling_config": {k: float(v) if isinstance(v, int) else v
                                              for k, v in entry["autoscaling_config"].items()},
              "logging_config": {"encoding": "TEXT"}}
    assert echo({**want, "deployments": [floats]}).runs(want)
    for key, value in entry.items():
        stale = {**entry, key: {"changed": True} if isinstance(value, dict) else "changed"}
        assert not echo({**want, "deployments": [stale]}).runs(want), key
    assert not echo({**want, "deployments": []}).runs(want)
    assert not echo({**want, "args": {**want["args"], "engine": {"model_source": "x"}}}).runs(want)
    assert not AppStatus("llm").runs(want)


# ---- typed status and SSE, on set answers (httpx.MockTransport) ----------------------------

SERVE_DETAILS = {
    "http_options": {"host": "0.0.0.0", "port": 8000},
    "applications": {
        "llm": {
            "status": "DEPLOYING", "message": "", "route_prefix": "/",
            "deployed_app_config": application(AppConfig()),
            "deployments": {DEPLOYMENT_NAME: {
                "status": "UPSCALING", "message": "Upscaling from 1 to 2 replicas.", "target_num_replicas": 2,
                "deployment_config": {"user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}},
                "replicas": [
                    {"replica_id": "r2", "state": "STARTING", "node_id": "bbbbbbbbbbbbbbbb", "pid": 12},
                    {"replica_id": "r1", "state": "RUNNING", "node_id": "aaaaaaaaaaaaaaaa", "pid": 11},
                ],
            }},
        },
        "router": {"status": "RUNNING", "route_prefix": "/router", "deployments": {}},
    },
}


def _transport(seen: list[httpx.Request], stream: list[httpx.Response] | None = None) -> httpx.MockTransport:
    """The dashboard at http://dash answers SERVE_DETAILS; the Serve proxy at http://serve answers chat calls
    (with the next of `stream` when the call streams)."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "dash" and request.url.path == "/api/serve/applications/":
            return httpx.Response(200, json=SERVE_DETAILS)
        if request.url.host == "serve" and request.url.path == "/v1/chat/completions":
            if json.loads(request.content).get("stream"):
                return stream.pop(0)
            return httpx.Response(200, json={"choices": [{"message": {"content": "Paris"}}]})
        return httpx.Response(404, json={"error": {"message": f"no route {request.url}"}})

    return httpx.MockTransport(handler)


def test_serve_status_is_parsed_into_typed_records():
    cluster = Cluster("http://dash", "http://serve", kind="address", how="test", transport=_transport([]))
    assert sorted(cluster.app_statuses()) == ["llm", "router"]
    st = cluster.app_status("llm")
    dep = st.deployment(DEPLOYMENT_NAME)
    assert (st.status, dep.status, dep.target_replicas, dep.running_ids) == ("DEPLOYING", "UPSCALING", 2, ["r1"])
    assert dep.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}
    assert [(r.replica_id, r.state, r.pid) for r in st.replicas] == [("r2", "STARTING", 12), ("r1", "RUNNING", 11)]
    assert st.running_replicas == 1 and st.serve_messages() == "Upscaling from 1 to 2 replicas."
    assert st.deployment("absent").replicas == () and cluster.app_status("gone") is None
    assert cluster.applications() == [
        {"app": "llm", "route_prefix": "/", "app_status": "DEPLOYING", "deployment": DEPLOYMENT_NAME,
         "deployment_status": "UPSCALING", "target_replicas": 2, "running_replicas": 1,
         "nodes": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "message": "Upscaling from 1 to 2 replicas."},
    ]
    gone = AppHandle(cluster, AppConfig(name="gone", route_prefix="/gone")).status()
    assert (gone.name, gone.status, gone.deployments) == ("gone", "NOT_DEPLOYED", {})


def test_handles_the_cluster_creates_send_through_its_transport():
    seen: list[httpx.Request] = []
    cluster = Cluster("http://dash", "http://serve", kind="address", how="test", token="dash-token",
                      transport=_transport(seen))
    handle = cluster.app("llm")
    assert (handle.name, handle.base_url, handle.model) == ("llm", "http://serve", AppConfig().engine.model_name)
    handle.api_key = "app-key"
    assert handle.chat("capital of France?") == "Paris"
    assert [(r.method, str(r.url), r.headers.get("authorization")) for r in seen] == [
        ("GET", "http://dash/api/serve/applications/", "Bearer dash-token"),
        ("POST", "http://serve/v1/chat/completions", "Bearer app-key"),
    ]
    assert cluster.deployed == set()  # attached, not ours


def _sse(*events: str, content_type: str = "text/event-stream") -> httpx.Response:
    return httpx.Response(200, headers={"content-type": content_type},
                          content="".join(f"data: {e}\n\n" for e in events).encode())


def test_stream_chat_reads_events_until_done_and_raises_in_band_errors():
    def delta(text: str) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})

    role_only = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    stream = [
        _sse(role_only, delta("Par"), delta("is"), "[DONE]", delta("never read")),
        _sse(delta("Par"), json.dumps({"error": {"message": "engine died: out of KV cache blocks"}})),
        _sse(delta("Par"), content_type="application/json"),
    ]
    seen: list[httpx.Request] = []
    transport = _transport(seen, stream)
    handle = AppHandle(Cluster("http://dash", "http://serve", kind="address", how="test", transport=transport),
                       AppConfig(), transport=transport)
    assert list(handle.stream_chat("hi", max_tokens=4)) == ["Par", "is"]
    assert json.loads(seen[0].content) == {"model": handle.model, "messages": [{"role": "user", "content": "hi"}],
                                           "stream": True, "temperature": 0.0, "max_tokens": 4}
    assert seen[0].headers["accept"] == "text/event-stream"
    got: list[str] = []
    with pytest.raises(ClusterError, match=r"^POST http://serve/v1/chat/completions \(stream\): the stream failed: "
                                           r"engine died: out of KV cache blocks$"):
        got.extend(handle.stream_chat("hi"))
    assert got == ["Par"]
    with pytest.raises(ClusterError, match=r"\(stream\): the answer is not an event stream: .*'application/json'"):
        list(handle.stream_chat("hi"))


# ---- on the real embedded Ray -------------------------------------------------------------

@pytest.mark.ray
def test_real_deploy_of_a_missing_model_fails_fast_with_serves_message(cluster):
    config = AppConfig(name="missing-model", route_prefix="/missing-model", engine={"model_source": "/nonexistent"},
                       deployment={"num_cpus": 0})
    t0 = time.monotonic()
    try:
        with pytest.raises(DeployError, match=r"application 'missing-model' is DEPLOY_FAILED: (?s:.*)/nonexistent"):
            cluster.deploy(config, timeout_s=300, progress=None)
        assert time.monotonic() - t0 < 180
        handle = cluster.app("missing-model")
        handle.request_timeout_s = 5
        t1 = time.monotonic()
        with pytest.raises(ClusterError, match=r"Serve reports application 'missing-model' DEPLOY_FAILED"):
            handle.chat("hi", max_tokens=4)
        assert time.monotonic() - t1 < 30
    finally:
        cluster.delete("missing-model")


@pytest.mark.ray
def test_real_update_that_cannot_load_its_model_is_a_deploy_error(cluster):
    config = AppConfig(name="to-break", route_prefix="/to-break", deployment={"num_cpus": 0})
    handle = cluster.deploy(config, timeout_s=600, progress=None)
    try:
        with pytest.raises(DeployError, match=r"'to-break' is (DEPLOY_FAILED|UNHEALTHY): (?s:.*)/nonexistent"):
            handle.update(config.with_overrides(**{"engine.model_source": "/nonexistent"}), timeout_s=300)
    finally:
        cluster.delete("to-break")
