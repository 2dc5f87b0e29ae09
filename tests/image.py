"""The serving image, built here with buildah from the real k8s/image/Dockerfile, and commands run inside it.

No registry is reachable, so `rayproject/ray` cannot be pulled: `standin_base()` makes a local stand-in
with what the Dockerfile and the manifests rely on (Debian 12's Python 3.11, the minor of the `-py311` tags;
user `ray` uid 1000 gid 100; a Python env at /home/ray/anaconda3 with pip, first on PATH). It carries no Ray,
so install.sh has to bring every pin itself. `podman run` cannot start containers here (no
CAP_SYS_RESOURCE); `buildah run --isolation chroot` can, on the host's network (../shared/FACTS.md).

Both images are cached in buildah's store under a tag that is a hash of what went into them: the base's
recipe; the image's Dockerfile, install.sh, wheel and base. A repeat run with nothing changed builds nothing.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from system_deps import require_executable

__all__ = ["IMAGE_PYTHON_BIN", "STANDIN", "built_image", "container", "require_buildah", "run_argv", "standin_base"]

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "k8s" / "image" / "Dockerfile"
INSTALL_SH = ROOT / "k8s" / "image" / "install.sh"
STANDIN = "localhost/ray-standin:2.60.0-py311-cpu"
IMAGE_REPO = "localhost/llmserve-nb-rehearsal"
IMAGE_PYTHON_BIN = "/home/ray/anaconda3/bin"
LOCAL_WHEELS = Path("/opt/wheels")
FIX = "Install them: apt-get install buildah mmdebstrap, or `make system-deps` as root"

# What rayproject images have that the Dockerfile and the manifests use; run inside the new root by mmdebstrap.
_STANDIN_SETUP = (
    'chroot "$1" useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray',
    'chroot "$1" runuser -u ray -- python3 -m venv /home/ray/anaconda3',
)
_STANDIN_PACKAGES = "python3,python3-venv,ca-certificates"
_STANDIN_CONFIG = (
    "--user", "1000", "--workingdir", "/home/ray", "--env", "HOME=/home/ray",
    "--env", f"PATH={IMAGE_PYTHON_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
)


def require_buildah() -> None:
    require_executable("buildah", FIX)
    require_executable("mmdebstrap", FIX)


def _buildah(*args: str, timeout: float = 120, log: Path | None = None) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
                           f"{done.stderr[-4000:]}")
    return done.stdout.strip()


def _exists(ref: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True,
                          timeout=60).returncode == 0


def _recipe() -> str:
    return repr((_STANDIN_PACKAGES, _STANDIN_SETUP, _STANDIN_CONFIG))


def standin_base() -> str:
    """The stand-in for rayproject/ray:2.60.0-py311-cpu (~30 s to build, then cached); its reference."""
    key = hashlib.sha256(_recipe().encode()).hexdigest()[:16]
    ref = f"{STANDIN}-{key}"
    if _exists(ref):
        _buildah("tag", ref, STANDIN)
        return STANDIN
    with tempfile.TemporaryDirectory(prefix="ray-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        hooks = [f"--customize-hook={step}" for step in _STANDIN_SETUP]
        done = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={_STANDIN_PACKAGES}", *hooks,
                               "bookworm", str(rootfs)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap exited {done.returncode}:\n{done.stderr[-4000:]}")
        ctr = _buildah("from", "scratch")
        try:
            _buildah("add", ctr, str(rootfs), "/", timeout=300)
            _buildah("config", *_STANDIN_CONFIG, ctr)
            _buildah("commit", "--quiet", ctr, ref, timeout=300)
        finally:
            _buildah("rm", ctr)
    _buildah("tag", ref, STANDIN)
    return STANDIN


def image_key(wheel: Path, base: str) -> str:
    digest = hashlib.sha256()
    for part in (DOCKERFILE.read_bytes(), INSTALL_SH.read_bytes(), wheel.read_bytes(),
                 _buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", base).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def built_image(wheel: Path, extras: str = "serve", log_dir: Path | None = None) -> tuple[str, float]:
    """The CPU image built by k8s/image/Dockerfile on the stand-in base, with `wheel` installed by
    install.sh; its reference and the build's seconds (0 when cached). Cold: uv downloads the serving
    stack and apt haproxy from Debian (minutes); a new wheel alone reinstalls from uv's cache mount (~40 s)."""
    base = standin_base()
    ref = f"{IMAGE_REPO}:{image_key(wheel, base)}"
    if _exists(ref):
        return ref, 0.0
    # The context holds what the Dockerfile copies and nothing else: the wheel in dist/, install.sh.
    with tempfile.TemporaryDirectory(prefix="image-context-") as tmp:
        context = Path(tmp)
        (context / "dist").mkdir()
        shutil.copy2(wheel, context / "dist" / wheel.name)
        (context / "k8s" / "image").mkdir(parents=True)
        shutil.copy2(INSTALL_SH, context / "k8s" / "image" / "install.sh")
        t0 = time.monotonic()
        _buildah(
            "bud", "--isolation", "chroot", "--layers", "-f", str(DOCKERFILE), "-t", ref,
            # uv inside the build reaches PyPI only with the host's CA bundle; /opt/wheels holds the CPU torch.
            "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "-v", f"{LOCAL_WHEELS}:{LOCAL_WHEELS}:ro",
            "--build-arg", f"RAY_IMAGE={base}", "--build-arg", f"EXTRAS={extras}",
            "--build-arg", "TORCH_INDEX=", "--build-arg", f"FIND_LINKS={LOCAL_WHEELS}", str(context),
            timeout=1800, log=(log_dir / "buildah-bud.log") if log_dir else None,
        )
    seconds = time.monotonic() - t0
    # Each build is ~2 GB; only the newest is worth keeping (its cached layers stay for the next build).
    for old in _buildah("images", "--format", "{{.Name}}:{{.Tag}}").split():
        if old.startswith(f"{IMAGE_REPO}:") and old != ref:
            subprocess.run(["buildah", "rmi", old], capture_output=True, timeout=120)
    return ref, seconds


@contextmanager
def container(image: str) -> Iterator[str]:
    """A working container of `image` (its name); removed on exit."""
    ctr = _buildah("from", "--pull-never", image)
    try:
        yield ctr
    finally:
        _buildah("rm", ctr)


def run_argv(ctr: str, argv: Sequence[str], env: dict[str, str], mounts: Sequence[Path] = ()) -> list[str]:
    """The command line that runs `argv` in `ctr` as user 1000 (the manifests' runAsUser) on the host's
    network, with exactly `env` and each of `mounts` at its own path."""
    flags = [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]
    flags += [arg for m in mounts for arg in ("-v", f"{m}:{m}")]
    return ["buildah", "run", "--isolation", "chroot", "--user", "1000", *flags, ctr, "--", *argv]
