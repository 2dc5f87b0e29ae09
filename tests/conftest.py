"""Shared fixtures: one embedded Ray + one deployed app per session (deploys cost ~15 s on 2 cores), and the
programs some tests run (missing: a skip here, a failure in CI; see system_deps.py).

The Ray clusters shared by many tests are closed right after the last test that uses them, not at the end of
the session, and the files that use one run next to each other: an idle Ray with an app keeps ~0.2 of the 2
cores busy (Serve's controller loop, the proxy, GCS, the dashboard), which every later test would pay."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
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


# Session fixtures that hold a running Ray: closed after their last user (see the module docstring).
SHARED_CLUSTERS = ("cluster", "app", "ray_cluster")


class SharedResources:
    """Session resources by fixture name, each closed as soon as no test left to run uses it. "Uses" is read
    from the tests' fixture closures, so a test must name these fixtures in its signature or in a fixture's,
    never fetch them with `request.getfixturevalue` (it would get a closed one)."""

    def __init__(self) -> None:
        self._open: dict[str, ExitStack] = {}
        self._last_user: dict[str, int] = {}  # fixture name -> position of the last test that uses it
        self._position: dict[int, int] = {}  # id(test) -> its position in the session

    def enter(self, name: str, resource: AbstractContextManager):
        stack = ExitStack()
        value = stack.enter_context(resource)
        self._open[name] = stack
        return value

    def close(self, name: str) -> None:
        stack = self._open.pop(name, None)
        if stack is not None:
            stack.close()

    def close_unused(self, item: pytest.Item) -> None:
        """After `item`'s teardown: close what no later test of the session uses (newest first: the app
        before the cluster it runs on)."""
        if not self._position:
            items = item.session.items
            self._position = {id(it): i for i, it in enumerate(items)}
            self._last_user = {name: i for i, it in enumerate(items) for name in SHARED_CLUSTERS
                               if name in it.fixturenames}
        position = self._position.get(id(item))
        for name in reversed(list(self._open)):
            if position is not None and self._last_user.get(name, -1) <= position:
                self.close(name)


shared = SharedResources()


def _cluster_group(item: pytest.Item) -> str | None:
    return next((name for name in ("cluster", "ray_cluster") if name in item.fixturenames), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files that use a shared cluster run together, at the place of the first of them; everything else
    keeps pytest's order (whole files move, so module fixtures still start once)."""
    files = [it.nodeid.split("::")[0] for it in items]
    group: dict[str, str] = {}
    for f, it in zip(files, items):
        if (name := _cluster_group(it)) is not None:
            group.setdefault(f, name)
    rank: dict[str, int] = {}
    for f in files:
        rank.setdefault(group.get(f, f), len(rank))
    order = {id(it): rank[group.get(f, f)] for f, it in zip(files, items)}
    items.sort(key=lambda it: order[id(it)])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    shared.close_unused(item)
    return result


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

    yield shared.enter("ray_cluster", running_cluster())
    shared.close("ray_cluster")


@pytest.fixture(scope="session")
def engine():
    from llmserve_nb.config import EngineConfig
    from llmserve_nb.engine import load_engine

    return load_engine(EngineConfig())


@contextmanager
def _embedded_cluster() -> Iterator:
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
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="session")
def cluster():
    yield shared.enter("cluster", _embedded_cluster())
    shared.close("cluster")


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
    yield shared.enter("app", _deployed(cluster, config))
    shared.close("app")


@contextmanager
def _deployed(cluster, config) -> Iterator:
    handle = cluster.deploy(config, progress=None)
    handle.api_key = API_KEY
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="session")
def openai_client(app):
    import openai

    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
