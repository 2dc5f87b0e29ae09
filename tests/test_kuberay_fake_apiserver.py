"""llmserve_nb.cluster.kuberay against a FAKE Kubernetes API server.

The server is kmock's `KubernetesEmulator`: a stateful fake of the API server that stores the objects we
create and answers get/list/patch/status over real HTTP, driven by the real `kubernetes` client. It is not
a kube-apiserver: it ignores label selectors, has no RBAC, no resourceVersion and no port-forward
websocket, so forbidden answers are injected and the port-forward is a FAKE `kubectl` script on PATH that
prints kubectl's port-forward lines and records how it was called (the kubeconfig it was given included).
Test names say `fake_apiserver` to keep that visible. The public path, `llmserve_nb.connect(kuberay=...,
api_client=...)`, is tested end to end against it with that kubectl pointing at a FakeDashboard (from
test_cluster_client) that checks the bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import kmock
import pytest
from kubernetes import client

from llmserve_nb import AppConfig, ClusterError, DeployError, connect
from llmserve_nb.backends import application
from llmserve_nb.cluster.errors import KubeRayError
from llmserve_nb.cluster.kuberay import KubeRayCluster, auth_secret_name, versions_from_image
from llmserve_nb.cluster.portforward import kubeconfig_of
from test_cluster_client import FakeDashboard

NS = "team-a"
HEAD_IMAGE = "rayproject/ray:2.60.0-py311-gpu"


class FakeApiServer:
    """kmock's KubernetesEmulator on a real localhost port, in its own event-loop thread."""

    def __init__(self, declare_ray: bool = True) -> None:
        started = threading.Event()

        async def main() -> None:
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
                for plural, kind in [("ray.io/v1/rayclusters", "RayCluster"), ("ray.io/v1/rayservices", "RayService")]:
                    if declare_ray:
                        emulator.resources[plural].kind = kind
                for plural, kind in [("v1/services", "Service"), ("v1/pods", "Pod"), ("v1/secrets", "Secret")]:
                    emulator.resources[plural].kind = kind
                self.emulator, self.url = emulator, str(server.url).rstrip("/")
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                started.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="fake-apiserver")
        self._thread.start()
        assert started.wait(10), "fake API server did not start"
        cfg = client.Configuration()
        cfg.host = self.url
        self.api = client.ApiClient(cfg)
        self.custom, self.core = client.CustomObjectsApi(self.api), client.CoreV1Api(self.api)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # Objects go in through the API, as an operator or kubectl would put them there.
    def add_cr(self, kind: str, name: str, spec: dict, status: dict | None = None) -> None:
        plural = kind.lower() + "s"
        body = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}
        self.custom.create_namespaced_custom_object("ray.io", "v1", NS, plural, body)
        if status is not None:
            self.set_status(kind, name, status)

    def set_status(self, kind: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", NS, kind.lower() + "s", name, {"status": status}
        )

    def add_service(self, name: str, ports: dict[str, int]) -> None:
        self.core.create_namespaced_service(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"ports": [{"name": n, "port": p} for n, p in ports.items()]},
            },
        )


@pytest.fixture()
def fake_apiserver():
    server = FakeApiServer()
    yield server
    server.stop()


def _cond(kind: str, ok: bool, reason: str = "Ok", message: str = "") -> dict:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-28T00:00:00Z",
    }


RC_SPEC = {
    "rayVersion": "2.60.0",
    "headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": HEAD_IMAGE}]}}},
}
READY = {
    "state": "ready",
    "conditions": [_cond("HeadPodReady", True), _cond("RayClusterProvisioned", True)],
    "readyWorkerReplicas": 1,
    "desiredWorkerReplicas": 1,
}
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}


def _cluster(server: FakeApiServer, name: str = "nb", **kw) -> KubeRayCluster:
    return KubeRayCluster(name, NS, api_client=server.api, **kw)


def test_fake_apiserver_ready_raycluster_is_found(fake_apiserver):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    kr = _cluster(fake_apiserver)
    kind, obj = kr.resource()
    assert (kind, obj["metadata"]["name"]) == ("RayCluster", "nb")
    ready, summary = kr.readiness()
    assert ready is True and summary == (
        f"RayCluster {NS}/nb: state=ready, HeadPodReady=True (Ok), RayClusterProvisioned=True (Ok), workers ready 1/1"
    )
    kr.wait_ready(timeout_s=1, poll_s=0.05)
    assert kr.versions() == ("2.60.0", "3.11")


def test_fake_apiserver_missing_cluster_names_what_exists(fake_apiserver):
    fake_apiserver.add_cr("RayCluster", "other", RC_SPEC)
    fake_apiserver.add_cr("RayService", "svc1", {"rayClusterConfig": RC_SPEC})
    with pytest.raises(KubeRayError) as err:
        _cluster(fake_apiserver, "nope").resource()
    msg = str(err.value)
    assert "'nope'" in msg and f"'{NS}'" in msg and "RayClusters: other" in msg and "RayServices: svc1" in msg


def test_fake_apiserver_missing_crd_asks_about_the_operator():
    server = FakeApiServer(declare_ray=False)
    try:
        with pytest.raises(KubeRayError, match=r"rayservices\.ray\.io.*is the KubeRay operator installed"):
            _cluster(server, "nb").resource()
    finally:
        server.stop()


def test_fake_apiserver_forbidden_is_reported_with_rbac_hint(fake_apiserver):
    (
        fake_apiserver.emulator["get", kmock.resource("ray.io", "v1", "rayservices")]
        << 403
        << {
            "kind": "Status",
            "code": 403,
            "reason": "Forbidden",
            "message": 'rayservices.ray.io "nb" is forbidden: User "bob" cannot get resource "rayservices"',
        }
    )
    with pytest.raises(
        KubeRayError, match=r"forbidden: cannot get RayService 'nb'.*User \"bob\".*get/list on rayclusters"
    ):
        _cluster(fake_apiserver).resource()


def test_fake_apiserver_wait_ready_sees_status_patched_from_another_thread(fake_apiserver):
    fake_apiserver.add_cr(
        "RayCluster",
        "nb",
        RC_SPEC,
        {
            "conditions": [
                _cond("HeadPodReady", False, "ContainersNotReady", "ray-head not ready"),
                _cond("RayClusterProvisioned", False),
            ]
        },
    )
    timer = threading.Timer(0.4, fake_apiserver.set_status, args=("RayCluster", "nb", READY))
    timer.start()
    seen: list[str] = []
    t0 = time.monotonic()
    _cluster(fake_apiserver).wait_ready(timeout_s=10, poll_s=0.05, progress=seen.append)
    timer.join()
    assert 0.3 < time.monotonic() - t0 < 5
    assert "HeadPodReady=False (ContainersNotReady: ray-head not ready)" in seen[0]
    assert "HeadPodReady=True" in seen[-1] and len(seen) == 2  # progress reports changes, not every poll


def test_fake_apiserver_wait_ready_times_out_with_the_last_status(fake_apiserver):
    fake_apiserver.add_cr(
        "RayCluster",
        "nb",
        RC_SPEC,
        {
            "state": "",
            "conditions": [
                _cond("HeadPodReady", False, "ContainersNotReady"),
                _cond("RayClusterProvisioned", False, "WaitingForPods"),
            ],
        },
    )
    seen: list[str] = []
    with pytest.raises(
        KubeRayError,
        match=r"not ready after 0\.3s; last status seen: RayCluster team-a/nb: .*"
        r"HeadPodReady=False \(ContainersNotReady\)",
    ):
        _cluster(fake_apiserver).wait_ready(timeout_s=0.3, poll_s=0.05, progress=seen.append)
    assert len(seen) == 1 and "RayClusterProvisioned=False (WaitingForPods)" in seen[0]


def test_fake_apiserver_rayservice_leads_to_its_active_cluster(fake_apiserver, monkeypatch):
    fake_apiserver.add_cr(
        "RayService",
        "llm",
        {"rayClusterConfig": RC_SPEC},
        {"serviceStatus": "", "conditions": [_cond("Ready", False, "Initializing")]},
    )
    kr = _cluster(fake_apiserver, "llm")
    with pytest.raises(KubeRayError, match="no active RayCluster yet"):
        kr.raycluster()
    assert kr.readiness()[0] is False
    fake_apiserver.add_cr("RayCluster", "llm-x7k2p", RC_SPEC, READY)
    fake_apiserver.add_service("llm-x7k2p-head-svc", HEAD_PORTS)
    fake_apiserver.set_status(
        "RayService",
        "llm",
        {
            "conditions": [_cond("Ready", True, "RunningServeApps")],
            "activeServiceStatus": {
                "rayClusterName": "llm-x7k2p",
                "applicationStatuses": {"llm": {"status": "RUNNING"}},
            },
        },
    )
    kr.wait_ready(timeout_s=1, poll_s=0.05)
    assert kr.resource()[0] == "RayService" and kr.raycluster()["metadata"]["name"] == "llm-x7k2p"
    assert "apps: llm=RUNNING" in kr.readiness()[1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with kr.connect() as conn:
        dns = f"llm-x7k2p-head-svc.{NS}.svc.cluster.local"
        assert (conn.how, conn.cluster_name, conn.ray_version, conn.python_version) == (
            "in-cluster-dns",
            "llm-x7k2p",
            "2.60.0",
            "3.11",
        )
        assert conn.dashboard_url == f"http://{dns}:8265" and conn.serve_url == f"http://{dns}:8000"
        assert conn.client_address == f"ray://{dns}:10001"


def test_fake_apiserver_head_service_ports_are_read_by_name(fake_apiserver):
    status = {**READY, "head": {"serviceName": "nb-head-svc-short"}}  # KubeRay's name wins over the convention
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, status)
    fake_apiserver.add_service(
        "nb-head-svc-short", {"dashboard": 18265, "serve": 18000, "gcs-server": 16379, "http": 80}
    )
    svc = _cluster(fake_apiserver).head_service()
    assert svc.name == "nb-head-svc-short" and svc.ports == {"dashboard": 18265, "serve": 18000, "gcs": 16379}
    assert svc.dns == f"nb-head-svc-short.{NS}.svc.cluster.local"


def test_fake_apiserver_missing_head_service_lists_services(fake_apiserver):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("unrelated", {"http": 80})
    with pytest.raises(
        KubeRayError, match=r"head service 'nb-head-svc' of RayCluster 'nb' not found .*services there: unrelated"
    ):
        _cluster(fake_apiserver).head_service()


def _fake_kubectl(tmp_path: Path, monkeypatch, forwards: dict[int, int] | None = None, stderr_bytes: int = 0) -> Path:
    """Put a FAKE `kubectl` first on PATH: it prints what `kubectl port-forward` prints, then stays up like it.

    `forwards` maps remote ports to the local ports it claims (default 40000 + port % 10000). It records its pid,
    arguments and the kubeconfig it was given (`--kubeconfig`, else None) in `kubectl-call` (JSON). With
    `stderr_bytes` it then writes that much to stderr and touches `stderr-written`, which it reaches only while
    someone reads its stderr (a pipe holds 64 KiB).
    """
    record, marker = tmp_path / "kubectl-call", tmp_path / "stderr-written"
    mapping = json.dumps({str(k): v for k, v in (forwards or {}).items()})
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys, time
forwards = json.loads({mapping!r})
args = sys.argv[1:]
kubeconfig = json.load(open(args[args.index("--kubeconfig") + 1])) if "--kubeconfig" in args else None
json.dump({{"pid": os.getpid(), "args": args, "kubeconfig": kubeconfig}}, open({str(record)!r}, "w"))
for a in sys.argv[1:]:
    if a.startswith(":"):
        local = forwards.get(a[1:], 40000 + int(a[1:]) % 10000)
        print(f"Forwarding from 127.0.0.1:{{local}} -> {{a[1:]}}", flush=True)
        print(f"Forwarding from [::1]:{{local}} -> {{a[1:]}}", flush=True)
for _ in range({stderr_bytes} // 100):
    sys.stderr.write("E0101 portforward.go: an error occurred forwarding 8265 -> 8265".ljust(99) + "\\n")
sys.stderr.flush()
open({str(marker)!r}, "w").close()
time.sleep(60)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return record


def _kubectl_call(record: Path) -> dict:
    return json.loads(record.read_text())


def _kubectl_pid(record: Path) -> int:
    return _kubectl_call(record)["pid"]


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_fake_apiserver_port_forward_goes_through_the_api_client_it_read(fake_apiserver, tmp_path, monkeypatch):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    record = _fake_kubectl(tmp_path, monkeypatch)
    fake_apiserver.api.configuration.api_key["BearerToken"] = "Bearer t0ken"
    conn = _cluster(fake_apiserver).connect()
    call = _kubectl_call(record)
    kubeconfig_file = call["args"][1]
    assert call["args"] == ["--kubeconfig", kubeconfig_file, "port-forward", "--address", "127.0.0.1", "-n", NS,
                            "svc/nb-head-svc", ":8265", ":8000", ":10001"]
    # kubectl reaches the API server the api_client does, with its credentials, not the user's kubeconfig.
    assert call["kubeconfig"]["clusters"] == [{"name": "api", "cluster": {"server": fake_apiserver.url}}]
    assert call["kubeconfig"]["users"] == [{"name": "api", "user": {"token": "t0ken"}}]
    assert call["kubeconfig"]["contexts"][0]["context"]["namespace"] == NS
    assert stat.S_IMODE(os.stat(kubeconfig_file).st_mode) == 0o600
    assert (conn.how, conn.dashboard_url, conn.serve_url, conn.client_address) == (
        "port-forward",
        "http://127.0.0.1:48265",
        "http://127.0.0.1:48000",
        "ray://127.0.0.1:40001",
    )
    conn.close()
    conn.close()
    with pytest.raises(ProcessLookupError):
        os.kill(call["pid"], 0)
    assert not os.path.exists(kubeconfig_file), "the kubeconfig holding the token outlived the port-forward"


def test_kubeconfig_of_a_client_configuration_keeps_tls_and_credentials():
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file = "https://k8s:6443", "/ca.pem", "/me.crt", "/me.key"
    cfg.api_key["BearerToken"] = "bearer from-a-pod"
    kubeconfig = kubeconfig_of(cfg, "team-b")
    assert kubeconfig["clusters"][0]["cluster"] == {"server": "https://k8s:6443", "certificate-authority": "/ca.pem"}
    assert kubeconfig["users"][0]["user"] == {"token": "from-a-pod", "client-certificate": "/me.crt",
                                              "client-key": "/me.key"}
    assert kubeconfig["current-context"] == "api" and kubeconfig["contexts"][0]["context"]["namespace"] == "team-b"
    cfg.verify_ssl = False
    cfg.api_key = {}
    kubeconfig = kubeconfig_of(cfg, "team-b")
    assert kubeconfig["clusters"][0]["cluster"]["insecure-skip-tls-verify"] is True
    assert kubeconfig["users"][0]["user"] == {"client-certificate": "/me.crt", "client-key": "/me.key"}


def test_fake_apiserver_kubectl_stderr_is_drained_so_it_never_blocks(fake_apiserver, tmp_path, monkeypatch, caplog):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    _fake_kubectl(tmp_path, monkeypatch, stderr_bytes=256 * 1024)
    with caplog.at_level(logging.WARNING, logger="llmserve_nb.cluster.portforward"), _cluster(fake_apiserver).connect():
        deadline = time.monotonic() + 10
        while not (tmp_path / "stderr-written").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "stderr-written").exists(), "kubectl blocked on a full stderr pipe"
    logged = [r.getMessage() for r in caplog.records if r.name == "llmserve_nb.cluster.portforward"]
    assert logged[0] == "kubectl port-forward svc/nb-head-svc: E0101 portforward.go: an error occurred forwarding 8265 -> 8265"


def test_fake_apiserver_kubectl_is_stopped_when_the_kernel_exits_without_closing(fake_apiserver, tmp_path, monkeypatch):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    record = _fake_kubectl(tmp_path, monkeypatch)
    kernel = f"""
from kubernetes import client
from llmserve_nb.cluster.kuberay import KubeRayCluster
cfg = client.Configuration()
cfg.host = {fake_apiserver.url!r}
conn = KubeRayCluster("nb", {NS!r}, api_client=client.ApiClient(cfg)).connect()
print(conn.dashboard_url)
"""  # and exits without conn.close()
    done = subprocess.run([sys.executable, "-c", kernel], capture_output=True, text=True, timeout=60, env=os.environ)
    assert done.returncode == 0 and "http://127.0.0.1:48265" in done.stdout, done.stderr[-2000:]
    assert _gone(_kubectl_pid(record)), "kubectl port-forward outlived the process that started it"
    assert not os.path.exists(_kubectl_call(record)["args"][1]), "its kubeconfig outlived the process"


def test_fake_apiserver_kubectl_failure_shows_its_stderr(fake_apiserver, tmp_path, monkeypatch):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    fake = tmp_path / "kubectl"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stderr.write('error: services \"nb-head-svc\" not found')\nsys.exit(1)\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with pytest.raises(KubeRayError, match=r"exited with 1: error: services \"nb-head-svc\" not found"):
        _cluster(fake_apiserver).connect()
    assert not list((tmp_path / "tmp").iterdir()), "a failed port-forward left its kubeconfig behind"


def test_fake_apiserver_without_kubectl_outside_the_cluster_says_what_to_install(fake_apiserver, tmp_path, monkeypatch):
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeRayError, match=r"needs `kubectl` on PATH for the port-forward .* or run this kernel in a pod"):
        _cluster(fake_apiserver).connect()


def _secret(server: FakeApiServer, name: str, data: dict[str, bytes]) -> None:
    server.core.create_namespaced_secret(
        NS,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        },
    )


def test_fake_apiserver_token_comes_from_the_clusters_auth_secret(fake_apiserver, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "this-machines-token")  # never sent to a KubeRay cluster
    _secret(fake_apiserver, "nb", {"auth_token": b"generated\n"})
    _secret(fake_apiserver, "mine", {"auth_token": b"chosen"})
    _secret(fake_apiserver, "bad", {"token": b"x"})
    fake_apiserver.add_cr("RayCluster", "plain", RC_SPEC, READY)
    fake_apiserver.add_cr("RayCluster", "nb", {**RC_SPEC, "authOptions": {"mode": "token"}}, READY)
    fake_apiserver.add_cr("RayCluster", "named", {**RC_SPEC, "authOptions": {"mode": "token", "secretName": "mine"}})
    fake_apiserver.add_cr("RayCluster", "off", {**RC_SPEC, "authOptions": {"mode": "disabled"}})
    k8s_auth = {"mode": "token", "enableK8sTokenAuth": True}
    fake_apiserver.add_cr("RayCluster", "k8s", {**RC_SPEC, "authOptions": k8s_auth})
    fake_apiserver.add_cr("RayCluster", "lost", {**RC_SPEC, "authOptions": {"mode": "token"}})
    assert _cluster(fake_apiserver, "plain").auth_token() is None
    assert _cluster(fake_apiserver, "off").auth_token() is None
    assert _cluster(fake_apiserver, "nb").auth_token() == "generated"  # the Secret KubeRay generates
    assert _cluster(fake_apiserver, "named").auth_token() == "chosen"  # authOptions.secretName
    assert _cluster(fake_apiserver, "nb").auth_token("mine") == "chosen"  # token_secret= overrides
    assert _cluster(fake_apiserver, "plain").auth_token("mine") == "chosen"
    with pytest.raises(KubeRayError, match=r"secret team-a/bad has no key 'auth_token' \(keys: token\)"):
        _cluster(fake_apiserver, "nb").auth_token("bad")
    with pytest.raises(KubeRayError, match=r"auth token secret 'lost' not found in namespace 'team-a'"):
        _cluster(fake_apiserver, "lost").auth_token()
    with pytest.raises(KubeRayError, match=r"enableK8sTokenAuth.*pass token="):
        _cluster(fake_apiserver, "k8s").auth_token()


@pytest.mark.parametrize("cluster, secret", [
    ("nb", "nb"),
    ("llm-x7k2p", "llm-x7k2p"),
    ("a" * 10 + "-" + "b" * 50, "b" * 50),  # KubeRay keeps the last 50 characters ...
    ("a" * 10 + "-" + "c" * 49, "r" + "c" * 49),  # ... and replaces a leading punctuation
    ("1nb", "rnb"),
])
def test_auth_secret_name_follows_kuberay(cluster, secret):
    assert auth_secret_name(cluster) == secret


@pytest.mark.parametrize("image, expected", [
    ("rayproject/ray:2.60.0-py311-gpu", ("2.60.0", "3.11")),
    ("registry:5000/rayproject/ray:2.60.0-py39", ("2.60.0", "3.9")),
    ("registry:5000/llmserve-nb", (None, None)),
    ("llmserve-nb:0.1.0-gpu", (None, None)),
    ("rayproject/ray", (None, None)),
])
def test_versions_from_image_tags(image, expected):
    assert versions_from_image(image) == expected


@pytest.fixture()
def head(fake_apiserver, tmp_path, monkeypatch):
    """A FAKE dashboard behind a fake `kubectl port-forward`: what connect(kuberay=...) reaches outside a pod."""
    dashboard = FakeDashboard(token="s3cret")
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    fake_apiserver.add_service("llm-x7k2p-head-svc", HEAD_PORTS)
    _secret(fake_apiserver, "nb", {"auth_token": b"s3cret"})
    _secret(fake_apiserver, "llm-x7k2p", {"auth_token": b"s3cret"})
    _secret(fake_apiserver, "custom", {"auth_token": b"custom-token"})
    dashboard.kubectl = _fake_kubectl(tmp_path, monkeypatch, forwards={8265: dashboard.port, 8000: 48000})
    yield dashboard
    dashboard.stop()


def _connect(server: FakeApiServer, name: str = "nb", **kw):
    return connect(kuberay=name, namespace=NS, api_client=server.api, timeout_s=5, **kw)


TOKEN_RC_SPEC = {**RC_SPEC, "rayVersion": "2.60.0", "authOptions": {"mode": "token"}}


def test_fake_apiserver_connect_kuberay_uses_the_auth_secret(fake_apiserver, head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "this-machines-token")
    fake_apiserver.add_cr("RayCluster", "nb", TOKEN_RC_SPEC, READY)
    cluster = _connect(fake_apiserver)
    assert (cluster.kind, cluster.how, cluster.managed_by) == ("kuberay", "port-forward", None)
    assert (cluster.dashboard_url, cluster.serve_url) == (head.url, "http://127.0.0.1:48000")
    assert {h.get("Authorization") for _, _, h, _ in head.requests} == {"Bearer s3cret"}
    cluster.shutdown()
    assert _gone(_kubectl_pid(head.kubectl)), "shutdown() left the port-forward running"


def test_fake_apiserver_connect_kuberay_explicit_token_and_token_secret_win(fake_apiserver, head):
    fake_apiserver.add_cr("RayCluster", "nb", TOKEN_RC_SPEC, READY)
    with pytest.raises(ClusterError, match=rf"dashboard at {head.url} rejected our credentials"):
        _connect(fake_apiserver, token="explicit")
    assert _gone(_kubectl_pid(head.kubectl)), "a failed connect left the port-forward running"
    head.token = "custom-token"
    _connect(fake_apiserver, token_secret="custom").shutdown()
    head.token = "explicit"
    _connect(fake_apiserver, token="explicit", token_secret="custom").shutdown()


def test_fake_apiserver_connect_kuberay_to_a_rayservice_is_managed(fake_apiserver, head):
    fake_apiserver.add_cr("RayService", "llm", {"rayClusterConfig": TOKEN_RC_SPEC}, {
        "conditions": [_cond("Ready", True, "RunningServeApps")],
        "activeServiceStatus": {"rayClusterName": "llm-x7k2p", "applicationStatuses": {"llm": {"status": "RUNNING"}}},
    })
    fake_apiserver.add_cr("RayCluster", "llm-x7k2p", TOKEN_RC_SPEC, READY)  # its Secret is named after it
    head.add_app(application(AppConfig()))
    cluster = _connect(fake_apiserver, "llm")
    assert cluster.managed_by == "llm"
    with pytest.raises(DeployError, match="belongs to RayService 'llm'"):
        cluster.deploy(AppConfig())
    assert cluster.app("llm").name == "llm"
    cluster.shutdown()
    assert set(head.apps) == {"llm"} and not [r for r in head.requests if r[0] in ("PUT", "DELETE")]


def test_fake_apiserver_connect_kuberay_refuses_a_version_skew(fake_apiserver, head):
    import ray

    fake_apiserver.add_cr("RayCluster", "nb", TOKEN_RC_SPEC, READY)
    head.ray_version = "2.9.3"
    with pytest.raises(ClusterError, match=rf"the cluster runs ray 2\.9\.3, this kernel has ray {ray.__version__}"):
        _connect(fake_apiserver)
    head.ray_version = ray.__version__
    old_python = {**TOKEN_RC_SPEC, "headGroupSpec": {"template": {"spec": {"containers": [
        {"name": "ray-head", "image": f"rayproject/ray:{ray.__version__}-py39"}]}}}}
    fake_apiserver.custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayclusters", "nb", {"spec": old_python})
    with pytest.raises(ClusterError, match=r"the cluster runs Python 3\.9, this kernel has Python"):
        _connect(fake_apiserver)
    _connect(fake_apiserver, check_version=False).shutdown()


def test_fake_apiserver_reached_through_a_kubeconfig_with_its_namespace(fake_apiserver, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake_apiserver.url}"}}}}]
users: [{{name: me, user: {{token: abc}}}}]
contexts:
- {{name: other, context: {{cluster: fake, user: me, namespace: elsewhere}}}}
- {{name: team, context: {{cluster: fake, user: me, namespace: {NS}}}}}
current-context: other
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake_apiserver.add_cr("RayCluster", "nb", RC_SPEC, READY)
    fake_apiserver.add_service("nb-head-svc", HEAD_PORTS)
    assert KubeRayCluster("nb").namespace == "elsewhere"
    kr = KubeRayCluster("nb", context="team")
    assert kr.namespace == NS and kr.readiness()[0] is True
    # The port-forward uses the same kubeconfig (kubectl reads $KUBECONFIG) and context, not a written one.
    record = _fake_kubectl(tmp_path, monkeypatch)
    with kr.connect() as conn:
        assert _kubectl_call(record)["args"][:3] == ["--context", "team", "port-forward"]
        assert _kubectl_call(record)["kubeconfig"] is None and conn.dashboard_url == "http://127.0.0.1:48265"
