"""Shared fixtures: one embedded Ray + one deployed app per session (deploys cost ~15 s on 2 cores)."""
from __future__ import annotations

import os

import pytest

API_KEY = "test-key-123"

# Ray's dashboard gets 60 s to come up by default; on a loaded 2-core CI machine that is not always enough.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")


@pytest.fixture(scope="session")
def engine():
    from llmserve_nb.config import EngineConfig
    from llmserve_nb.engine import load_engine

    return load_engine(EngineConfig())


@pytest.fixture(scope="session")
def cluster():
    from llmserve_nb import connect

    c = connect()
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def app(cluster):
    """The app under test, with an API key so the auth path is exercised on every request."""
    from llmserve_nb import AppConfig

    # The key goes to the replica through the app's runtime_env and to the handle directly; never into
    # os.environ, which Ray heads and notebook kernels started later by other tests would inherit.
    config = AppConfig(
        name="test-llm",
        route_prefix="/",
        runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": API_KEY}},
    ).with_overrides(**{"batching.max_batch_size": 8, "batching.batch_wait_timeout_s": 0.1})
    handle = cluster.deploy(config, progress=None)
    handle.api_key = API_KEY
    yield handle
    handle.shutdown()


@pytest.fixture(scope="session")
def openai_client(app):
    import openai

    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
