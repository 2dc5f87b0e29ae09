"""The project's wheel, built once per content, and fresh venvs to install it into.

Tests that must see the package the way a user gets it (no editable install, no source tree on the path)
take `built_wheel()` and install it with `fresh_venv(path, f"{wheel}[serve]")`.

- The wheel is keyed by a hash of what goes into it (the package, the notebooks it ships, pyproject.toml and
  README.md), so an unchanged tree costs a hash of ~100 files. It is built from a copy of those files, so the
  build neither litters the checkout nor picks up anything the hash did not see, and the finished folder is
  renamed into place: two processes building at once both succeed, the second rename simply loses.
- Venvs are made by uv, whose cache (~/.cache/uv) makes a repeat install of the same pins a matter of
  hardlinks. uv does not read pip.conf, so the local wheel folder (/opt/wheels: the CPU build of the pinned
  torch) is passed explicitly; the package's own `torch==2.13.0` pin keeps the resolver there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["LOCAL_WHEELS", "WHEEL_CACHE", "built_wheel", "fresh_venv", "source_hash", "uv_binary"]

ROOT = Path(__file__).resolve().parents[1]
WHEEL_CACHE = Path.home() / ".cache" / "llmserve_nb" / "wheels"
LOCAL_WHEELS = Path("/opt/wheels")
# What the wheel is made of; anything else in the checkout cannot change it.
SOURCES = ("pyproject.toml", "README.md", "llmserve_nb", "notebooks")
_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _source_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        top = root / name
        if top.is_file():
            files.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.endswith(_SKIP_SUFFIXES))
    return files


def source_hash(root: Path = ROOT) -> str:
    """A hash of every file the wheel is built from, and of their paths."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("llmserve_nb-*.whl"))
    return wheels[0] if wheels else None


def built_wheel() -> Path:
    """The project's wheel for the tree as it is now: from the cache, else built (~2 s)."""
    key = source_hash()
    dest = WHEEL_CACHE / key
    if (cached := _cached_wheel(dest)) is not None:
        return cached
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEEL_CACHE, prefix=f".build-{key}-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        for path in _source_files():
            target = src / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        # Keyed by what was copied: a file edited since the hash above makes a wheel of the newer tree, filed
        # under its own hash rather than the stale one.
        dest = WHEEL_CACHE / source_hash(src)
        # pip with this venv's setuptools: no build isolation, so no package index is needed to build.
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
            capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or _cached_wheel(out) is None:
            raise RuntimeError(f"building the wheel failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        try:
            out.rename(dest)
        except OSError:
            # Another process renamed its build into place first; its wheel is the same content.
            if _cached_wheel(dest) is None:
                raise
    wheel = _cached_wheel(dest)
    assert wheel is not None
    return wheel


def uv_binary() -> str:
    """The uv executable: the one the `uv` package put beside this venv's python, else uv on PATH."""
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise FileNotFoundError("uv is not installed: pip install uv (it is in the [test] extra)") from None
        return found


def fresh_venv(path: Path | str, *requirements: str, extra_args: Sequence[str] = (),
               find_links: Iterable[Path | str] | None = None, python: str | None = None,
               seed: bool = False, timeout: float = 900) -> Path:
    """A new venv at `path` (replacing whatever is there) with `requirements` installed; its python.

    find_links defaults to /opt/wheels where it exists. `python` is the interpreter to base it on (this
    one by default, so the venv's Python matches the tests'); `seed` adds pip and setuptools to it, for
    callers that install with pip themselves. `extra_args` go to `uv pip install` as they are.
    """
    venv = Path(path)
    uv = uv_binary()
    # uv reads no pip.conf, and a run under a caller's VIRTUAL_ENV must not install there.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.setdefault("UV_CACHE_DIR", str(Path.home() / ".cache" / "uv"))
    env["UV_NO_PROGRESS"] = "1"
    create = [uv, "venv", "--clear", "--quiet", "--python", python or sys.executable, str(venv)]
    if seed:
        create.append("--seed")
    _run(create, env, timeout)
    venv_python = venv / "bin" / "python"
    if requirements:
        links = [LOCAL_WHEELS] if find_links is None and LOCAL_WHEELS.is_dir() else list(find_links or ())
        install = [uv, "pip", "install", "--quiet", "--python", str(venv_python)]
        for link in links:
            install += ["--find-links", str(link)]
        _run([*install, *extra_args, *requirements], env, timeout)
    return venv_python


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
