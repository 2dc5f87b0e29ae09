"""`llmserve-nb` command line. Each concern module registers its own sub-commands via `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ("llmserve_nb.k8s", "llmserve_nb.bench", "llmserve_nb.notebooks", "llmserve_nb.backends.vllm.env")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmserve-nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
