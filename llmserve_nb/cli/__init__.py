"""`llmserve-nb`: deploy, inspect and chat with apps on a Ray cluster; render Kubernetes manifests; run the
notebooks headless; load-test a server; build the vLLM CPU venv.

The top level only assembles the parser and turns failures into exit codes: each concern registers its own
sub-commands with `add_cli(subparsers)`, imported lazily so that `--help` and `--version` work from the core
install. Exit codes, for every command: 0 done, 1 the operation failed (one `error: ...` on stderr, no
traceback, for the failures a user can act on), 2 the command line is wrong (argparse's usage error).
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

__all__ = ["main", "package_version"]

# In the order `--help` lists them: apps on a cluster, Kubernetes, load tests, notebooks, the vLLM venv.
_COMMAND_MODULES = ("llmserve_nb.cli.apps", "llmserve_nb.k8s", "llmserve_nb.bench", "llmserve_nb.notebooks",
                    "llmserve_nb.backends.vllm.env")

_EPILOG = """\
commands by concern:
  apps on a Ray cluster   deploy, status, chat, delete
  Kubernetes manifests    k8s render | check | validate
  load tests              bench
  notebooks               run-notebooks, check-notebooks
  vLLM on CPU             vllm-env

examples:
  llmserve-nb deploy app.yaml --address http://head:8265
  llmserve-nb deploy app.yaml --kuberay llm-notebook --namespace llm
  llmserve-nb status --address http://head:8265
  llmserve-nb chat "What is the capital of France?" --address http://head:8265 --app llm
  llmserve-nb delete llm --address http://head:8265
  llmserve-nb k8s render --config app.yaml --model Qwen/Qwen2.5-0.5B-Instruct --out my-overlay
  llmserve-nb run-notebooks 00_quickstart

`llmserve-nb COMMAND --help` shows each command's options and examples.
"""


def package_version() -> str:
    try:
        return version("llmserve-nb")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def _version_line() -> str:
    try:
        ray = f"ray {version('ray')}"
    except PackageNotFoundError:
        ray = "no ray"
    return f"llmserve-nb {package_version()} (Python {platform.python_version()}, {ray})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve-nb", description=__doc__.split("\n\n")[0],
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    """What a command may fail with that is the user's to fix (a cluster, a config, a file, the network):
    reported in one line. Anything else is a bug and keeps its traceback."""
    import httpx

    from llmserve_nb.cluster.errors import ClusterError
    from llmserve_nb.config import ConfigError

    return ClusterError, ConfigError, httpx.HTTPError, OSError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "llmserve_nb":
            raise
        print(f"error: `llmserve-nb {args.command}` needs the Python package {e.name!r}, which this install lacks; "
              "install the extra that brings it, e.g. pip install 'llmserve-nb[notebook]'", file=sys.stderr)
        return 1
    except _known_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
