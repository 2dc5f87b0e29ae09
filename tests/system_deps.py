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


# The tests' CRDs (the package has no default folder): KubeRay v1.7, Gateway API v1.4, Prometheus Operator v0.93.
SHARED_CRDS = tuple(Path(__file__).resolve().parents[2] / "shared" / f / "crds"
                    for f in ("kuberay", "gateway-api", "prometheus-operator"))


def require_crds() -> list[Path]:
    """The CRD folders ($LLMSERVE_NB_CRDS; conftest defaults it to SHARED_CRDS), once every kind k8s/ holds is
    found in them."""
    from llmserve_nb import k8s

    folders = [Path(p) for p in os.environ.get(k8s.CRD_ENV, "").split(os.pathsep) if p]
    kinds = [("ray.io", "RayService"), ("ray.io", "RayCluster"), ("gateway.networking.k8s.io", "Gateway"),
             ("gateway.networking.k8s.io", "HTTPRoute"), ("monitoring.coreos.com", "PodMonitor"),
             ("monitoring.coreos.com", "PrometheusRule")]
    try:
        source = k8s.crd_source(folders or None)
        for group, kind in kinds:
            source.crd(group, kind)
    except k8s.ManifestError as e:
        missing(str(e), f"They come in ../shared/*/crds beside the repo; elsewhere set {k8s.CRD_ENV}="
                        f"DIR[{os.pathsep}DIR...] holding them (`kubectl get crd <plural>.<group> -o yaml > DIR/x.yaml`)")
    return folders


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
