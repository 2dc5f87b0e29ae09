"""Shared fixtures: one embedded Ray + one deployed app per session (deploys cost ~15 s on 2 cores), and the
programs some tests run (missing: a skip here, a failure in CI; see system_deps.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from system_deps import (
    SHARED_CRDS,
    require_chromium,
    require_crds,
    require_kubectl,
    require_promtool,
    require_vllm_venv,
)

API_KEY = "test-key-123"

# Ray's dashboard gets 60 s to come up by default; on a loaded 2-core CI machine that is not always enough.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")
# The package has no default CRD folder; the tests (and the notebooks they run, which inherit it) use ../shared.
os.environ.setdefault("LLMSERVE_NB_CRDS", os.pathsep.join(map(str, SHARED_CRDS)))


@pytest.fixture(scope="session")
def crds() -> list[Path]:
    """The CRD folders ($LLMSERVE_NB_CRDS, by default ../shared/*/crds), every kind k8s/ holds found in them."""
    return require_crds()


@pytest.fixture(scope="session")
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_kubectl()


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_promtool()


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The cached vLLM venv (`make vllm-env`), built when absent or stale."""
    return require_vllm_venv()


@pytest.fixture(scope="session")
def quickstart_demo(tmp_path_factory):
    """`llmserve-nb run-notebooks 00_quickstart` exactly as `make demo` runs it, once per session: the quickstart's
    results, its nbval re-run and the demo-output check all read this one run (each run costs ~40 s).
    Returns the finished process (output captured) and the executed notebook's path."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("runs")
    env = {k: v for k, v in os.environ.items() if k != "LLMSERVE_NB_API_KEY"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("llmserve-nb")), "run-notebooks", "00_quickstart", "--out", str(out),
         "-p", "burst_size=8", "-p", "max_tokens=24"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=840,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (executed,) = out.glob("*/00_quickstart.ipynb")
    return run, executed


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray (`ray start` head + worker, token auth), shared by the tests that need one: each start
    costs ~20 s. Teardown raises if any process of it survives."""
    from ray_cluster import running_cluster

    with running_cluster() as c:
        yield c


@pytest.fixture(scope="session")
def engine():
    from llmserve_nb.config import EngineConfig
    from llmserve_nb.engine import load_engine

    return load_engine(EngineConfig())


@pytest.fixture(scope="session")
def cluster():
    """The embedded Ray, started with retries: on a loaded 2-core machine Ray's fixed 30 s raylet start-up
    wait is sometimes not enough, and pytest would cache the failure for the whole session."""
    from llmserve_nb import connect
    from llmserve_nb.cluster import ClusterError

    attempts = 3  # each failed ray.init leaves its gcs_server behind: do not loop long
    for attempt in range(attempts):
        try:
            c = connect()
            break
        except ClusterError as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def app(cluster):
    """The app under test, with an API key so the auth path is exercised on every request."""
    from llmserve_nb import AppConfig
    from llmserve_nb.config import API_KEY_ENV

    # The key goes to the replica through the app's runtime_env and to the handle directly; never into
    # os.environ, which Ray heads and notebook kernels started later by other tests would inherit.
    config = AppConfig(
        name="test-llm",
        route_prefix="/",
        runtime_env={"env_vars": {API_KEY_ENV: API_KEY}},
    ).with_overrides(**{"batching.max_batch_size": 8, "batching.batch_wait_timeout_s": 0.1})
    handle = cluster.deploy(config, progress=None)
    handle.api_key = API_KEY
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def openai_client(app):
    import openai

    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
