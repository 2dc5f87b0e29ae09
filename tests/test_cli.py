"""The `llmserve-nb` command line: parsing, exit codes, `--version`/`--help`, the app commands against set answers
(httpx.MockTransport) and against a real Ray (the session's embedded cluster), and the CLI as a user installs it
(the built wheel, core only, in a fresh venv outside the source tree).

Exit codes: 0 done, 1 the operation failed (one `error: ...` line, no traceback), 2 a wrong command line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import yaml

from llmserve_nb.backends import application
from llmserve_nb.cli import main
from llmserve_nb.cli.apps import ADDRESS_ENVS
from llmserve_nb.cluster import Cluster
from llmserve_nb.cluster.ports import free_port
from llmserve_nb.config import API_KEY_ENV, DEPLOYMENT_NAME, AppConfig
from system_deps import missing

COMMANDS = ("deploy", "status", "chat", "delete", "k8s", "bench", "run-notebooks", "check-notebooks", "vllm-env")
APP_COMMANDS = ("deploy", "status", "chat", "delete")


@pytest.fixture(autouse=True)
def _no_address_from_the_environment(monkeypatch):
    for name in (*ADDRESS_ENVS, API_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) as the script runs it: argparse's exits (--help, --version, usage errors) become codes too."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---- parsing, --version, --help ------------------------------------------------------------------
def test_version_names_the_installed_package(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.startswith(f"llmserve-nb {version('llmserve-nb')} (Python "), out


def test_help_lists_every_command_with_examples(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed, listed
    assert "examples:" in out and "llmserve-nb deploy app.yaml --address" in out


@pytest.mark.parametrize("command", APP_COMMANDS)
def test_each_app_command_has_examples_and_the_cluster_options(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"llmserve-nb {command}" in out
    assert all(option in out for option in ("--address", "--kuberay", "--namespace", "--token")), out


def test_a_wrong_command_line_exits_2(capsys):
    assert _run(capsys, "frobnicate")[0] == 2
    assert _run(capsys)[0] == 2
    assert _run(capsys, "chat")[0] == 2  # no prompt
    code, _, err = _run(capsys, "status", "--address", "http://a:8265", "--kuberay", "b")
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("argv", [("deploy", "app.yaml"), ("status",), ("chat", "hi"), ("delete", "llm")])
def test_without_a_cluster_the_app_commands_refuse_to_start_an_embedded_ray(capsys, monkeypatch, argv):
    monkeypatch.setattr("llmserve_nb.cluster.connect", _must_not_connect)
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert "--address" in err and "--kuberay" in err and "would stop when it exits" in err, err


def _must_not_connect(*args, **kwargs):
    raise AssertionError(f"connect({args}, {kwargs}) was called")


# ---- exit 1: one line, no traceback --------------------------------------------------------------
def test_an_unreachable_cluster_is_one_error_line(capsys):
    code, _, err = _run(capsys, "status", "--address", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert "cannot reach the Ray dashboard" in _one_error_line(err)


def test_a_bad_app_file_fails_before_connecting(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("llmserve_nb.cluster.connect", _must_not_connect)
    bad = tmp_path / "app.yaml"
    bad.write_text("engine: {dtype: float8}\n")
    code, _, err = _run(capsys, "deploy", str(bad), "--address", "http://head:8265")
    assert code == 1 and f"{bad}: invalid llmserve_nb config" in _one_error_line(err) and "engine.dtype" in err
    bad.write_text("engine: [unclosed\n")
    code, _, err = _run(capsys, "deploy", str(bad), "--address", "http://head:8265")
    assert code == 1 and "is not a valid AppConfig file" in _one_error_line(err)
    code, _, err = _run(capsys, "deploy", str(tmp_path / "absent.yaml"), "--address", "http://head:8265")
    assert code == 1 and "No such file" in _one_error_line(err)


# ---- the app commands on set answers ----------------------------------------------------------------
def _serve_details() -> dict:
    llm = AppConfig(route_prefix="/llm")
    return {"applications": {
        "llm": {"status": "RUNNING", "message": "", "route_prefix": "/llm", "deployed_app_config": application(llm),
                "deployments": {DEPLOYMENT_NAME: {"status": "HEALTHY", "message": "", "target_num_replicas": 2,
                                                  "replicas": [{"replica_id": "r1", "state": "RUNNING"},
                                                               {"replica_id": "r2", "state": "STARTING"}]}}},
        "broken": {"status": "DEPLOY_FAILED", "message": "ModuleNotFoundError: No module named 'llmserve_nb'",
                   "route_prefix": "/broken", "deployments": {}},
    }}


@pytest.fixture
def fake_cluster(monkeypatch):
    """`connect()` answers a Cluster whose dashboard (http://dash) and Serve proxy (http://serve) are set answers;
    the requests it saw and the arguments connect() got are kept."""
    seen: list[httpx.Request] = []
    connected: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "dash" and request.url.path == "/api/serve/applications/":
            return httpx.Response(200, json=_serve_details())
        if request.url.path == "/llm/v1/chat/completions":
            if request.headers.get("authorization") != "Bearer sekret":
                return httpx.Response(401, json={"error": {"message": "missing or wrong API key"}})
            if json.loads(request.content).get("stream"):
                chunks = [{"choices": [{"delta": {"content": c}}]} for c in ("Pa", "ris")]
                body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
            return httpx.Response(200, json={"choices": [{"message": {"content": "Paris"}}]})
        return httpx.Response(404, json={"error": {"message": f"no route {request.url}"}})

    def connect(**target):
        connected.append(target)
        return Cluster("http://dash", "http://serve", kind="address", how="test", transport=httpx.MockTransport(handler))

    monkeypatch.setattr("llmserve_nb.cluster.connect", connect)
    return seen, connected


def test_status_prints_a_table_with_serve_s_reason_for_a_failed_app(capsys, fake_cluster):
    code, out, _ = _run(capsys, "status", "--address", "http://head:8265")
    assert code == 0
    header, llm, broken, reason = out.strip().splitlines()
    assert header.split()[:3] == ["APP", "STATUS", "URL"]
    assert llm.split() == ["llm", "RUNNING", "http://serve/llm", DEPLOYMENT_NAME, "HEALTHY", "1/2", "running"]
    assert broken.split()[:2] == ["broken", "DEPLOY_FAILED"]
    assert reason == "broken: ModuleNotFoundError: No module named 'llmserve_nb'"


def test_status_json_of_one_app_and_an_unknown_one(capsys, fake_cluster, monkeypatch):
    monkeypatch.setenv(ADDRESS_ENVS[0], "http://from-env:8265")
    code, out, _ = _run(capsys, "status", "llm", "--json")
    assert code == 0
    (app,) = json.loads(out)
    assert (app["app"], app["status"], app["url"]) == ("llm", "RUNNING", "http://serve/llm")
    assert app["deployments"][0]["replicas"] == ["RUNNING", "STARTING"]
    assert fake_cluster[1][-1]["address"] == "http://from-env:8265"  # the environment's address was used
    code, _, err = _run(capsys, "status", "nope", "--address", "http://head:8265")
    assert code == 1 and "no Serve application 'nope'" in _one_error_line(err) and "broken, llm" in err


def test_chat_sends_the_key_and_prints_the_answer(capsys, fake_cluster, monkeypatch):
    code, out, _ = _run(capsys, "chat", "Capital of France?", "--app", "llm", "--api-key", "sekret",
                        "--address", "http://head:8265")
    assert (code, out) == (0, "Paris\n")
    body = json.loads(fake_cluster[0][-1].content)
    assert body["messages"] == [{"role": "user", "content": "Capital of France?"}] and body["max_tokens"] == 128
    monkeypatch.setenv(API_KEY_ENV, "sekret")
    code, out, _ = _run(capsys, "chat", "Capital of France?", "--app", "llm", "--stream", "--address", "http://h:8265")
    assert (code, out) == (0, "Paris\n")
    monkeypatch.delenv(API_KEY_ENV)
    code, _, err = _run(capsys, "chat", "Capital of France?", "--app", "llm", "--address", "http://head:8265")
    assert code == 1 and "HTTP 401: missing or wrong API key" in _one_error_line(err)


def test_delete_of_an_app_that_is_not_there(capsys, fake_cluster):
    code, _, err = _run(capsys, "delete", "nope", "--address", "http://head:8265")
    assert code == 1 and "no Serve application 'nope'" in _one_error_line(err)
    code, out, _ = _run(capsys, "delete", "nope", "--ignore-not-found", "--address", "http://head:8265")
    assert (code, out) == (0, "nope: not deployed\n")
    assert not [r for r in fake_cluster[0] if r.method == "PUT"]


class _RecordingCluster:
    """Keeps what `deploy` was asked; answers with a handle whose app is RUNNING."""

    kind, how, serve_url = "address", "test", "http://serve"

    def __init__(self):
        self.deploys: list[tuple[AppConfig, dict]] = []
        self.closed = False

    def deploy(self, config, **options):
        from llmserve_nb.cluster import AppHandle, AppStatus

        self.deploys.append((config, options))
        handle = AppHandle(self, config)
        handle.status = lambda: AppStatus(config.name, status="RUNNING")
        return handle

    def close(self):
        self.closed = True


def test_deploy_passes_name_shipping_pip_and_wait_through(capsys, monkeypatch, tmp_path):
    cluster = _RecordingCluster()
    monkeypatch.setattr("llmserve_nb.cluster.connect", lambda **target: cluster)
    (tmp_path / "app.yaml").write_text("route_prefix: /qwen\nengine: {model_source: Qwen/Qwen2.5-0.5B-Instruct}\n")
    code, out, _ = _run(capsys, "deploy", str(tmp_path / "app.yaml"), "--address", "http://head:8265", "--name", "qwen",
                        "--no-ship-package", "--pip", "serve", "--no-wait", "--timeout", "5")
    assert code == 0 and cluster.closed
    config, options = cluster.deploys[-1]
    assert (config.name, config.route_prefix, config.engine.model_source) == ("qwen", "/qwen",
                                                                              "Qwen/Qwen2.5-0.5B-Instruct")
    assert options["ship_package"] is False and options["pip"] == "serve"
    assert (options["wait"], options["timeout_s"]) == (False, 5.0)
    assert out.splitlines()[0].startswith("qwen: RUNNING in ") and "http://serve/qwen/v1" in out
    code, _, _ = _run(capsys, "deploy", str(tmp_path / "app.yaml"), "--address", "http://head:8265",
                      "--pip", "transformers>=5", "--pip", "gguf")
    assert code == 0
    options = cluster.deploys[-1][1]
    assert options["ship_package"] is None and options["pip"] == ["transformers>=5", "gguf"] and options["wait"]


# ---- the real thing: the session's embedded Ray -----------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_deploy_status_chat_delete_on_a_real_cluster(cluster, capsys, tmp_path):
    from llmserve_nb.cluster import read_ray_token

    key = "cli-key-1"
    app_file = tmp_path / "app.yaml"
    app_file.write_text(yaml.safe_dump({
        "name": "cli-test", "route_prefix": "/cli-test",
        # Beside the session's app on the 2-core machine: half a CPU, one torch thread.
        "engine": {"torch_threads": 1, "max_num_seqs": 4}, "batching": {"max_batch_size": 4},
        "deployment": {"num_cpus": 0.5},
        "runtime_env": {"env_vars": {API_KEY_ENV: key}},
    }))
    target = ["--address", cluster.dashboard_url, "--serve-url", cluster.serve_url]
    if token := read_ray_token():
        target += ["--token", token]
    try:
        code, out, err = _run(capsys, "deploy", str(app_file), *target, "--timeout", "300")
        assert code == 0, err[-3000:]
        assert out.startswith("cli-test: RUNNING in ") and f"{cluster.serve_url}/cli-test/v1" in out, out

        code, out, err = _run(capsys, "status", "cli-test", "--json", *target)
        assert code == 0, err
        (app,) = json.loads(out)
        assert app["status"] == "RUNNING" and app["deployments"][0]["running_replicas"] == 1, app

        code, out, err = _run(capsys, "chat", "What is the capital of France?", "--app", "cli-test", "--api-key", key,
                              "--max-tokens", "24", *target)
        assert code == 0 and "Paris" in out, (out, err)
        code, _, err = _run(capsys, "chat", "What is the capital of France?", "--app", "cli-test", *target)
        assert code == 1 and "HTTP 401" in _one_error_line(err)

        code, out, err = _run(capsys, "delete", "cli-test", *target)
        assert (code, out) == (0, "cli-test: deleted\n"), err
        assert cluster.app_status("cli-test") is None
    finally:
        if cluster.app_status("cli-test") is not None:
            cluster.delete("cli-test")


# ---- vllm-env: the package reaches the vLLM venv without pip or a source tree -------------------------
def test_vllm_env_links_this_package_and_nothing_else(tmp_path):
    from llmserve_nb.backends.vllm import env

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env._link_package(venv)
    env._link_package(venv)  # again, as a rebuild from another install does: the link is replaced
    probe = ("import importlib.util, json; spec = importlib.util.find_spec('llmserve_nb'); "
             "print(json.dumps([spec.origin, importlib.util.find_spec('pydantic') is None]))")
    done = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    origin, no_pydantic = json.loads(done.stdout)
    assert Path(origin).resolve() == env.PACKAGE_DIR / "__init__.py"
    assert no_pydantic  # this environment's other packages stay out of the vLLM venv


# ---- from the installed wheel ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed_cli(tmp_path_factory) -> Path:
    """`llmserve-nb` of the built wheel installed, core only, into a fresh venv."""
    from wheel import built_wheel, fresh_venv, uv_binary

    try:
        uv_binary()
    except FileNotFoundError as e:
        missing(str(e), "Install it: pip install uv (the [test] extra has it)")
    try:
        python = fresh_venv(tmp_path_factory.mktemp("core") / "venv", str(built_wheel()))
    except RuntimeError as e:
        if "dns error" in str(e) or "Failed to fetch" in str(e):
            missing(f"uv could not reach a package index: {str(e)[-400:]}", "Run it where PyPI answers")
        raise
    return python.parent / "llmserve-nb"


def _installed(cli: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    # Outside the source tree and without the caller's path: only the wheel can answer.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(cli), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_installed_wheel_answers_version_help_and_k8s_render(installed_cli, tmp_path):
    done = _installed(installed_cli, tmp_path, "--version")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"llmserve-nb {version('llmserve-nb')} (Python ") and "no ray" in done.stdout

    done = _installed(installed_cli, tmp_path, "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"    {command}" in done.stdout for command in COMMANDS), done.stdout

    (tmp_path / "app.yaml").write_text(yaml.safe_dump({
        "name": "qwen", "engine": {"model_source": "Qwen/Qwen2.5-0.5B-Instruct"}}))
    done = _installed(installed_cli, tmp_path, "k8s", "render", "--config", "app.yaml", "--out", "overlay")
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = "\n".join(p.read_text() for p in (tmp_path / "overlay").rglob("*.yaml"))
    assert "Qwen/Qwen2.5-0.5B-Instruct" in rendered, sorted((tmp_path / "overlay").rglob("*"))

    done = _installed(installed_cli, tmp_path, "status")
    assert done.returncode == 2 and "--address" in done.stderr
