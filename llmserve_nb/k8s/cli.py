"""`llmserve-nb render-k8s` and `llmserve-nb validate-k8s`."""

from __future__ import annotations

import argparse
import sys

from llmserve_nb.k8s.tree import check_manifests, write_manifests
from llmserve_nb.k8s.validate import CRD_ENV, GATEWAY_CRD_ENV, PROMETHEUS_CRD_ENV, validate_files


def _cmd_render(args: argparse.Namespace) -> int:
    if args.check:
        problems = check_manifests(args.out)
        for p in problems:
            sys.stdout.write(p)
        if problems:
            print(
                f"{args.out}/ drifted from the renderer: run `llmserve-nb render-k8s --out {args.out}`", file=sys.stderr
            )
            return 1
        print(f"{args.out}/ is up to date")
        return 0
    for path in write_manifests(args.out):
        print(path)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    errors = validate_files(args.paths, crds=args.crds)
    for e in errors:
        print(e)
    print(f"{len(errors)} error(s)" if errors else "all manifests valid", file=sys.stderr)
    return 1 if errors else 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("render-k8s", help="render the k8s/ manifests from the profiles")
    p.add_argument("--out", default="k8s", help="output folder (default: k8s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 and print a diff if files drift")
    p.set_defaults(func=_cmd_render)
    v = subparsers.add_parser("validate-k8s", help="validate manifests against their CRDs and Kubernetes schemas")
    v.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders")
    v.add_argument(
        "--crds",
        default=None,
        help=f"folder with the KubeRay CRD YAMLs (default: ${CRD_ENV} or ../shared/kuberay/crds); Gateway API "
        f"and Prometheus Operator CRDs are looked up there, then in ${GATEWAY_CRD_ENV} / ${PROMETHEUS_CRD_ENV}",
    )
    v.set_defaults(func=_cmd_validate)
