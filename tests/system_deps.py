"""What some tests need beyond the Python packages: Debian's chromium and prometheus (with promtool),
kubectl, the CRDs in ../shared and the cached vLLM venv.

Where one is missing, the test skips on a developer's machine, the message naming the command that
installs it, and fails in CI (`CI=true`): `.ci/run` installs them all, so a skip there would be a
missing install step passing as a green run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

# As root it installs the Debian packages and, where no kubectl is on PATH, Kubernetes' release binary.
SYSTEM_DEPS = "`make system-deps` as root"


def missing(what: str, fix: str) -> NoReturn:
    """Skip, saying what is missing and how to fix it; in CI (CI=true), fail instead."""
    message = f"{what}. {fix}."
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: .ci/run must provide it, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def require_executable(name: str, fix: str) -> str:
    """The program's path on PATH, else `missing`."""
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not on PATH", fix)
    return found


def require_dir(path: Path, expected: tuple[str, ...], fix: str) -> Path:
    """`path`, holding every file named in `expected`, else `missing`."""
    absent = [name for name in expected if not (path / name).is_file()]
    if absent:
        missing(f"{path} lacks {', '.join(absent)}", fix)
    return path


def require_chromium() -> str:
    return require_executable("chromium", f"Install it: apt-get install chromium, or {SYSTEM_DEPS}")


def require_prometheus() -> str:
    return require_executable("prometheus", f"Install it: apt-get install prometheus, or {SYSTEM_DEPS}")


def require_promtool() -> str:
    return require_executable("promtool", f"Install it: apt-get install prometheus (promtool comes with it), or "
                                          f"{SYSTEM_DEPS}")


def require_kubectl() -> str:
    # Not Debian's kubernetes-client: its kubectl 1.20 carries kustomize 2.0, which lacks the targeted
    # `patches:` of k8s/'s overlays (kubectl 1.21 brought kustomize 4).
    return require_executable("kubectl", f"Put kubectl >= 1.21 on PATH, or run {SYSTEM_DEPS}")


def require_crds() -> Path:
    """The KubeRay CRD folder, once the Gateway API and Prometheus Operator ones are found too."""
    from llmserve_nb import k8s
    from llmserve_nb.k8s.validate import GATEWAY_CRD_ENV, PROMETHEUS_CRD_ENV

    # The kinds k8s/ holds, per family.
    families = {
        "kuberay": (k8s.CRD_ENV, ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml")),
        "gateway-api": (GATEWAY_CRD_ENV, ("gateway.networking.k8s.io_gateways.yaml",
                                          "gateway.networking.k8s.io_httproutes.yaml")),
        "prometheus-operator": (PROMETHEUS_CRD_ENV, ("monitoring.coreos.com_podmonitors.yaml",
                                                     "monitoring.coreos.com_prometheusrules.yaml")),
    }
    for family, (env, files) in families.items():
        require_dir(k8s.crd_dir(None, family), files, (
            f"They come in ../shared/{family}/crds beside the repo; elsewhere set {env}=DIR holding those files "
            f"(`kubectl get crd <plural>.<group> -o yaml > DIR/<group>_<plural>.yaml`)"))
    return k8s.crd_dir()


def require_vllm_venv() -> Path:
    """The cached vLLM venv, built here when absent or stale (~3 min); skip or fail when no package index
    answers. Any other build failure is an error of the recipe, raised as it is."""
    from llmserve_nb.backends.vllm.env import VllmEnvError, build_vllm_env

    try:
        return build_vllm_env(log=lambda line: print(line, flush=True))
    except VllmEnvError as e:
        if not e.network:
            raise
        missing(f"cannot build the vLLM venv (no package index reachable?): {str(e)[-500:]}",
                "Build it with `make vllm-env`")
