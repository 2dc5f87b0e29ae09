"""Ship this package to a Ray cluster that does not have it, as Ray's job submission client ships code.

A stock Ray image (KubeRay's `rayproject/ray`) has no `llmserve_nb`, so an application that imports it
fails with ModuleNotFoundError. The package therefore travels in the application's runtime_env:

- the package itself as a `py_modules` entry: a zip of the `llmserve_nb` directory this kernel imports
  (about 210 KB), uploaded to the cluster's GCS through the dashboard (`GET /api/packages/gcs/<name>`:
  404 when absent, and Ray pins the URI for 10 minutes on that GET, so it outlives the wait until the
  replicas, detached actors, hold it; then `PUT` with the zip's bytes), as
  `ray.dashboard.modules.dashboard_sdk` does for `ray job submit`;
- its Python dependencies as a runtime_env `pip` list (`pip="serve"`: what a replica needs beyond
  Ray), or not at all when the cluster's image has them. Ray 2.60's runtime_env `image_uri` runs a
  replica in another image through podman on the node; a KubeRay cluster's own image is the usual way.

The zip is deterministic (entries sorted, fixed timestamps and modes, no `__pycache__`), and its URI
is its content hash, so deploying the same code again yields the same runtime_env: a changed
runtime_env is a new code version in Serve and would restart every replica.
"""
from __future__ import annotations

import hashlib
import io
import re
import sys
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence, Union

from llmserve_nb.config import ConfigError

__all__ = [
    "DISTRIBUTION",
    "PackageZip",
    "PipSpec",
    "Shipping",
    "declared_requirements",
    "imports_this_package",
    "local_package",
    "missing_module_hint",
    "package_zip",
    "replica_requirements",
]

DISTRIBUTION = "llmserve-nb"
PACKAGE = "llmserve_nb"
# Ray's prefix for uploaded packages, then our name, so that a later deploy can tell an earlier version of
# this package (to replace it) from the user's own py_modules (kept).
_URI_PREFIX = f"gcs://_ray_pkg_{PACKAGE}_"
# The earliest timestamp a zip entry can hold: any fixed one makes the bytes independent of checkout times.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}
_SKIPPED_SUFFIXES = (".pyc", ".pyo")

# pip=: "serve" (the replica's requirements, as this package declares them), a list of requirements,
# or Ray's own dict form ({"packages": [...], "pip_install_options": [...]}).
PipSpec = Union[str, Sequence[str], dict[str, Any], None]


@dataclass(frozen=True)
class PackageZip:
    """The zipped package and its content-addressed URI."""

    data: bytes = field(repr=False)
    sha1: str

    @property
    def uri(self) -> str:
        return f"{_URI_PREFIX}{self.sha1}.zip"

    @property
    def name(self) -> str:
        """The package's name in the dashboard's `/api/packages/gcs/<name>` routes."""
        return self.uri.removeprefix("gcs://")


def local_package() -> Path:
    """The directory of the `llmserve_nb` this process imports (installed or a source checkout)."""
    return Path(__file__).resolve().parents[1]


def _files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not _SKIPPED_DIRS.intersection(rel.parts) and not path.name.endswith(_SKIPPED_SUFFIXES):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def package_zip(root: Path | None = None) -> PackageZip:
    """The deterministic zip of the package directory `root` (default: this package), entries under
    `<root name>/` as Ray's py_modules expects (its parent directory goes on the replicas' PYTHONPATH).
    About 15 ms for this package, so it is simply rebuilt whenever asked for."""
    root = (root or local_package()).resolve()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in _files(root):
            info = zipfile.ZipInfo(f"{root.name}/{path.relative_to(root).as_posix()}", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    return PackageZip(data=data, sha1=hashlib.sha1(data).hexdigest())


def declared_requirements() -> list[str]:
    """This package's requirements as its metadata writes them (`spec; extra == "serve"`). From the source
    checkout's pyproject.toml when the package runs from one, since an editable install's metadata is only
    as fresh as its last `pip install -e .`; else from the installed distribution."""
    pyproject = local_package().parent / "pyproject.toml"
    if pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(pyproject.read_text()).get("project") or {}
        if project.get("name") == DISTRIBUTION:
            extras = project.get("optional-dependencies") or {}
            return [*project.get("dependencies", []),
                    *(f'{spec}; extra == "{extra}"' for extra, specs in extras.items() for spec in specs)]
    try:
        return metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"pip='serve' reads the [serve] requirements from {DISTRIBUTION}'s metadata, and this {PACKAGE} "
            f"({local_package()}) is not installed: pip install -e . (or the wheel), or pass pip=[...]"
        ) from None


def replica_requirements(declared: list[str] | None = None) -> list[str]:
    """`pip="serve"`: what a replica needs beyond Ray, from this package's `declared` requirements (default:
    `declared_requirements()`): its core requirements (the package's top level imports them) and the
    `[serve]` extra, with Ray left out (the cluster has its own, which must match this kernel's anyway) and
    torch kept at its pin."""
    wanted = []
    for requirement in declared_requirements() if declared is None else declared:
        spec, _, marker = requirement.partition(";")
        marker = marker.strip()
        if marker and not re.fullmatch(r"""extra\s*==\s*["']serve["']""", marker):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if name and name.group(0).lower() not in ("ray", DISTRIBUTION):
            wanted.append(spec.strip())
    return wanted


def _pip_entry(pip: PipSpec) -> list[str] | dict[str, Any] | None:
    if pip is None or isinstance(pip, dict):
        return pip
    if isinstance(pip, str):
        if pip != "serve":
            raise ConfigError(f"pip={pip!r}: use 'serve', a list of requirements, or Ray's pip dict")
        return replica_requirements()
    return list(pip)


@dataclass(frozen=True)
class Shipping:
    """What one application's runtime_env gets: this package (`package`) and a pip list (`pip`, None: leave
    the runtime_env's own pip alone)."""

    package: bool
    pip: list[str] | dict[str, Any] | None = None

    @classmethod
    def of(cls, package: bool, pip: PipSpec = None) -> Shipping:
        return cls(package=package, pip=_pip_entry(pip))

    @classmethod
    def of_running(cls, runtime_env: dict[str, Any] | None) -> Shipping:
        """The shipping an application already running has: this package only if its runtime_env names it,
        and its own pip list. Attaching to an app (a RayService's, whose image has the package) and then
        reconfiguring it must not add a runtime_env it lacked: that would restart every replica."""
        env = runtime_env or {}
        ours = any(isinstance(m, str) and m.startswith(_URI_PREFIX) for m in env.get("py_modules") or [])
        return cls(package=ours, pip=env.get("pip"))

    def apply(self, application: dict[str, Any], package: PackageZip | None) -> dict[str, Any]:
        """The Serve application entry with its runtime_env as `runtime_env` makes it (none when empty)."""
        runtime_env = self.runtime_env(application.get("runtime_env"), package)
        entry = {k: v for k, v in application.items() if k != "runtime_env"}
        if runtime_env:
            entry["runtime_env"] = runtime_env
        return entry

    def runtime_env(self, runtime_env: dict[str, Any] | None, package: PackageZip | None) -> dict[str, Any]:
        """`runtime_env` with this package's URI (replacing an earlier version of it, keeping the user's own
        py_modules) and the pip list."""
        env = dict(runtime_env or {})
        modules = [m for m in env.get("py_modules") or [] if not (isinstance(m, str) and m.startswith(_URI_PREFIX))]
        if self.package and package is not None:
            modules.append(package.uri)
        if modules:
            env["py_modules"] = modules
        else:
            env.pop("py_modules", None)
        if self.pip is not None:
            env["pip"] = self.pip
        return env


def imports_this_package(application: dict[str, Any]) -> bool:
    """The Serve application entry names code of this package anywhere but in its runtime_env: its import path,
    the vLLM app's ingress class, an autoscaling policy function. Only such entries get the package."""

    def names_it(value: Any) -> bool:
        if isinstance(value, dict):
            return any(names_it(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(names_it(v) for v in value)
        return isinstance(value, str) and value.startswith(f"{PACKAGE}.")

    return names_it({k: v for k, v in application.items() if k != "runtime_env"})


_MISSING = re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '([\w.]+)'")


def missing_module_hint(serve_message: str) -> str | None:
    """For a Serve message that reports a missing Python module, what to do about it; else None."""
    found = _MISSING.search(serve_message)
    if found is None:
        return None
    module = found.group(1)
    if module.split(".")[0] == PACKAGE:
        return (f"the cluster does not have the Python package {module!r}. Deploy with ship_package=True (the "
                f"default on a cluster this kernel does not share) to upload it, or run the cluster on an image "
                f"with {DISTRIBUTION}[serve] installed")
    return (f"the cluster lacks the Python module {module!r}, which {PACKAGE}'s replicas import. Fix either way: "
            f"deploy with pip='serve' (or pip=['<requirement>', ...]) to install the replica's requirements in the "
            f"app's runtime_env, or run the cluster on an image that has {DISTRIBUTION}[serve]'s dependencies")
