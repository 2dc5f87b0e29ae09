"""The CPU RayService rehearsed end to end without Kubernetes (tests/rehearsal.py), twice: from the built wheel
installed by k8s/image/install.sh into a fresh venv outside the source tree, and inside the image that
k8s/image/Dockerfile builds (tests/image.py). Notebook 01 then connects to it with target="address" from the
project's kernel (the notebook side), while the cluster runs only what the wheel and the image carry.

The other committed profiles need GPUs (num_gpus in their serveConfigV2), so they cannot schedule here; what can
be checked on CPU is that each one's model loads in the fresh venv, on the CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from image import IMAGE_PYTHON_BIN, built_image, container, require_buildah, run_argv
from llmserve_nb.notebooks import read_results
from rehearsal import (
    ROOT,
    Launcher,
    RehearsalCluster,
    RenderedService,
    check_outside_source,
    render_rayservice,
    venv_launcher,
)
from wheel import built_wheel, fresh_venv, uv_binary

# The CPU image's extras, as the Dockerfile's header builds it; the venv gets exactly these.
IMAGE_EXTRAS = "serve"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def service(kubectl) -> RenderedService:
    return render_rayservice(kubectl)


@pytest.fixture(scope="module")
def wheel() -> Path:
    return built_wheel()


@pytest.fixture(scope="module")
def rehearsal_python(wheel, tmp_path_factory) -> Path:
    """A fresh venv in a temp dir with the wheel installed by install.sh with uv, as the image installs it."""
    python = fresh_venv(tmp_path_factory.mktemp("rehearsal") / "venv")
    # The installer's env is this machine's (CA bundle, proxies), never this venv's or the source tree's.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "CONDA_PREFIX")}
    env |= {"PATH": f"{Path(uv_binary()).parent}:/usr/bin:/bin", "INSTALLER": "uv", "EXTRAS": IMAGE_EXTRAS,
            "FIND_LINKS": "/opt/wheels" if Path("/opt/wheels").is_dir() else ""}
    done = subprocess.run(["sh", str(ROOT / "k8s" / "image" / "install.sh"), str(python), str(wheel)], env=env,
                          cwd=python.parent.parent, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"install.sh failed:\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
    return python


def run_notebook_01(cluster: RehearsalCluster, service: RenderedService, out_dir: Path, crds: Path) -> dict:
    """Notebook 01 through papermill in the project's kernel, target="address"; its tagged results."""
    # Attach to the app the RayService runs (KubeRay owns its config), tune it live, benchmark it briefly.
    params = {"target": "address", "address": cluster.dashboard_url, "serve_url": cluster.serve_url,
              "token": cluster.token, "app": service.serve_config["applications"][0]["name"],
              "tune_max_batch_size": 4, "benchmark_concurrency": [2], "crds": str(crds)}
    out = out_dir / "01_connect_cluster.ipynb"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The Secret's API key reaches the kernel as a pod's would ($LLMSERVE_NB_API_KEY).
    env["LLMSERVE_NB_API_KEY"] = service.api_key
    done = subprocess.run(
        [str(Path(sys.executable).with_name("papermill")), str(ROOT / "notebooks" / "01_connect_cluster.ipynb"),
         str(out), "-y", yaml.safe_dump(params), "-k", "python3", "--cwd", str(out_dir), "--no-progress-bar",
         "--execution-timeout", "600"],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"notebook 01 failed:\n{done.stderr[-4000:]}"
    return read_results(out)


def refuses_without_the_key(cluster: RehearsalCluster, service: RenderedService) -> None:
    """The Secret's key is enforced: the notebook's kernel had it, a caller without it gets 401."""
    client = cluster.client()
    try:
        handle = client.app(service.serve_config["applications"][0]["name"])
        handle.api_key = None
        unauthorized = httpx.post(f"{handle.base_url}/v1/chat/completions", timeout=60,
                                  json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
        assert unauthorized.status_code == 401, (unauthorized.status_code, unauthorized.text[:300])
    finally:
        client.close()


def assert_notebook_results(results: dict, service: RenderedService) -> None:
    workers = sum(g.get("replicas", 1) for g in service.cluster_spec["workerGroupSpecs"])
    assert results["target"] == "address"
    assert results["nodes"] == 1 + workers, results
    head_cpus = float(service.cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    assert results["cpus"] >= head_cpus + workers, results
    assert results["app_nodes"] and set(results["app_nodes"]) <= set(results["node_ids"]), results
    assert results["manifest_errors"] == [], results["manifest_errors"]
    assert results["attached"] is True and "Paris" in results["answer"], results["answer"]
    tuned = results["tuned"]
    assert tuned["same_replicas"] is True, "a live batching change restarted the replica"
    assert 1 < tuned["burst"]["max_batch_size_seen"] <= 4, tuned
    (level,) = results["benchmark"]
    assert level["errors"] == 0 and level["completed"] > 0 and level["output_tok_per_s"] > 0, level


def rehearse(cluster: RehearsalCluster, service: RenderedService, out_dir: Path, crds: Path) -> None:
    """Start the RayService's nodes, deploy its serveConfigV2, run notebook 01 against it, exercise the app;
    every process stopped afterwards, whatever failed."""
    timings = {}
    t0 = time.monotonic()
    try:
        cluster.start()
        timings["nodes_alive_s"] = time.monotonic() - t0
        cluster.deploy()
        timings["running_s"] = time.monotonic() - t0
        results = run_notebook_01(cluster, service, out_dir, crds)
        timings["notebook_s"] = time.monotonic() - t0
        assert_notebook_results(results, service)
        refuses_without_the_key(cluster, service)
        print(json.dumps({"launcher": cluster.launcher.name, **timings, "answer": results["answer"],
                          "burst": results["tuned"]["burst"], "benchmark": results["benchmark"]}, default=str))
    finally:
        cluster.stop()


@pytest.mark.ray
@pytest.mark.notebook
def test_cpu_rayservice_from_the_wheel_in_a_fresh_venv(service, rehearsal_python, crds, tmp_path):
    cluster = RehearsalCluster(service, venv_launcher(rehearsal_python))
    assert check_outside_source(cluster).startswith(str(rehearsal_python.parent.parent))
    rehearse(cluster, service, tmp_path, crds)


@pytest.fixture(scope="module")
def image(wheel, tmp_path_factory) -> str:
    require_buildah()
    ref, seconds = built_image(wheel, extras=IMAGE_EXTRAS, log_dir=tmp_path_factory.mktemp("image-build"))
    print(f"image {ref}: {'cached' if not seconds else f'built in {seconds:.0f}s'}")
    return ref


@pytest.mark.ray
@pytest.mark.notebook
def test_cpu_rayservice_in_the_image(service, image, crds, tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="lsnbr-", dir="/tmp"))
    # The pod's user owns its volumes (the manifests' fsGroup 100); Ray writes its session there.
    os.chown(temp_dir, 1000, 100)
    host_env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
    with container(image) as ctr:
        # The temp dir at the same path inside, so Ray's sockets and logs are where the host looks for them.
        launcher = Launcher(f"image {image}", IMAGE_PYTHON_BIN,
                            lambda argv, env: (run_argv(ctr, argv, env, mounts=[temp_dir]), host_env))
        cluster = RehearsalCluster(service, launcher, temp_dir=temp_dir)
        assert check_outside_source(cluster).startswith("/home/ray/anaconda3/")
        rehearse(cluster, service, tmp_path, crds)


def test_every_profiles_model_loads_on_cpu_in_the_fresh_venv(rehearsal_python, tmp_path):
    """The GPU profiles' RayServices cannot schedule here (num_gpus); their models must still load from what
    the wheel and install.sh put in the venv, here on the CPU."""
    from llmserve_nb import k8s
    from llmserve_nb.backends import config_of_application
    from llmserve_nb.k8s.profiles import PROFILE_NAMES, profile

    engines = {}
    for name in PROFILE_NAMES:
        rendered = yaml.safe_load(k8s.rayservice(profile(name))["spec"]["serveConfigV2"])
        for app in rendered["applications"]:
            # Read back from the rendered app, whichever backend rendered it (a vLLM app has no `engine` arg).
            engine = config_of_application(app).engine.model_dump(mode="json")
            engines.setdefault(json.dumps(engine, sort_keys=True), []).append(name)
    script = (
        "import json, sys\n"
        "from llmserve_nb.config import EngineConfig\n"
        "from llmserve_nb.engine import create_engine\n"
        "for line in sys.stdin:\n"
        "    cfg = EngineConfig(**json.loads(line))\n"
        "    if cfg.backend != 'transformers':\n"
        "        print('SKIP', cfg.backend, cfg.model_source); continue\n"
        "    engine = create_engine(cfg.model_copy(update={'device': 'cpu', 'dtype': 'float32'}))\n"
        "    print('LOADED', cfg.model_source, type(engine).__name__); engine.close()\n"
    )
    done = subprocess.run([str(rehearsal_python), "-c", script], input="\n".join(engines), cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    outcomes = [line for line in done.stdout.splitlines() if line.startswith(("LOADED", "SKIP"))]
    assert len(outcomes) == len(engines), done.stdout
    print(json.dumps({", ".join(names): line for names, line in zip(engines.values(), outcomes)}))
    # Only a vLLM engine is out of reach: it needs the [vllm] extra of the GPU image.
    assert all(line.startswith("LOADED") or line.startswith("SKIP vllm") for line in outcomes), outcomes
