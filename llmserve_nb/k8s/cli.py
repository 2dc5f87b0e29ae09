"""`llmserve-nb k8s render|check|validate`: Kubernetes manifests from the profiles or from your own AppConfig.

Exit codes: 0 ok, 1 failure (drift, invalid manifests), 2 usage (bad arguments, no CRD source).
Nothing here imports ray or torch: a core install (no extras) renders; validation needs jsonschema and
kubernetes-validate (the [notebook] extra), and checks serveConfigV2 against Ray's schema only where ray is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_RENDER_EXAMPLES = """\
examples:
  # your model, your image, your namespace: a kustomize overlay in ./my-llm
  llmserve-nb k8s render --config app.yaml --model Qwen/Qwen2.5-0.5B-Instruct \\
      --image registry.example.com/llmserve-nb:0.1.0-gpu --namespace team-a --name my-llm --out my-llm
  # ... validated right away against the CRDs of the cluster kubectl points at
  llmserve-nb k8s render --config app.yaml --name my-llm --out my-llm --from-cluster
  # this repository's k8s/ tree from the built-in profiles (what `make render-k8s` runs)
  llmserve-nb k8s render --out k8s
"""

_VALIDATE_EXAMPLES = """\
examples:
  llmserve-nb k8s validate my-llm/ --from-cluster                 # CRDs read from the current kube context
  llmserve-nb k8s validate my-llm/ --from-cluster --context prod
  llmserve-nb k8s validate k8s/ --crds ./crds                      # CRD YAML you saved, e.g. with
      # kubectl get crd rayservices.ray.io rayclusters.ray.io -o yaml > crds/kuberay.yaml
"""


def _crd_source(args: argparse.Namespace):  # -> CrdSource; ManifestError when none is named
    from llmserve_nb.k8s.crds import ClusterCrds, crd_source

    if args.from_cluster:
        return ClusterCrds(args.context)
    return crd_source(args.crds or None)


def _validate(paths: list[str], args: argparse.Namespace) -> int:
    from llmserve_nb.k8s.options import ManifestError
    from llmserve_nb.k8s.validate import serve_schema_available, validate_files

    try:
        source = _crd_source(args)
    except ManifestError as e:  # no source named at all: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        errors = validate_files(paths, crds=source)
    except ManifestError as e:  # a CRD the source lacks, an unreachable cluster
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: validation needs {e.name}: pip install 'llmserve-nb[notebook]'", file=sys.stderr)
        return 2
    for e in errors:
        print(e)
    if not serve_schema_available():
        print("note: serveConfigV2 not checked against Ray's ServeDeploySchema (ray is not installed)", file=sys.stderr)
    print(f"{len(errors)} error(s)" if errors else f"all manifests valid (CRDs: {source!r})", file=sys.stderr)
    return 1 if errors else 0


def _cmd_render(args: argparse.Namespace) -> int:
    from llmserve_nb.k8s.tree import dump_files, write_files, write_manifests

    if args.config is None:
        given = [f"--{k}" for k in ("image", "model", "namespace", "name") if getattr(args, k) is not None]
        if given:
            args.parser.error(f"{', '.join(given)} need --config (without it the built-in profiles are rendered)")
        for path in write_manifests(args.out or "k8s"):
            print(path)
        return 0
    if args.out is None:
        args.parser.error("--config needs --out DIR (the folder the overlay is written to)")
    from pydantic import ValidationError

    from llmserve_nb.config import AppConfig, ConfigError
    from llmserve_nb.k8s.options import USER_HEADER
    from llmserve_nb.k8s.overlay import user_overlay, user_spec

    try:
        app = AppConfig.from_file(args.config)
        if args.model is not None:
            app = app.with_overrides(**{"engine.model_source": args.model})
        spec = user_spec(app, image=args.image or _default_image(app), namespace=args.namespace or "llmserve",
                         name=args.name or app.name)
    except (OSError, ValueError, ValidationError, ConfigError) as e:
        args.parser.error(str(e))
    for path in write_files(args.out, dump_files(user_overlay(app, spec, args.out), USER_HEADER)):
        print(path)
    print(f"kubectl apply -k {args.out}   (after creating {args.out}/api-key.env: see api-key.env.example)",
          file=sys.stderr)
    if args.crds or args.from_cluster:
        return _validate([args.out], args)
    print(f"validate it: llmserve-nb k8s validate {args.out} --from-cluster (or --crds DIR; needs llmserve-nb[notebook])",
          file=sys.stderr)
    return 0


def _default_image(app) -> str:
    from llmserve_nb.k8s.options import CPU_CLUSTER, ClusterSpec

    return ClusterSpec().image if app.deployment.num_gpus else CPU_CLUSTER.image


def _cmd_check(args: argparse.Namespace) -> int:
    from llmserve_nb.k8s.tree import check_manifests

    problems = check_manifests(args.out)
    for p in problems:
        sys.stdout.write(p)
    if problems:
        print(f"{args.out}/ drifted from the renderer: run `llmserve-nb k8s render --out {args.out}`", file=sys.stderr)
        return 1
    print(f"{args.out}/ is up to date")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        args.parser.error(f"no such file or folder: {', '.join(missing)}")
    return _validate(args.paths, args)


def _add_crd_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--crds", action="append", metavar="DIR",
                     help="folder of CRD YAML files (any names; repeatable); default: $LLMSERVE_NB_CRDS")
    src.add_argument("--from-cluster", action="store_true",
                     help="read the CRDs from the cluster's API (apiextensions.k8s.io/v1, like `kubectl get crd`)")
    p.add_argument("--context", help="kubeconfig context for --from-cluster (default: the current one)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    k8s = subparsers.add_parser(
        "k8s", help="render, check and validate Kubernetes (KubeRay) manifests",
        description="Kubernetes manifests for KubeRay: render an overlay for your AppConfig, validate manifests "
                    "against your cluster's CRDs, check the k8s/ tree for drift.",
    )
    sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="{render,check,validate}")

    render = sub.add_parser(
        "render", help="render a kustomize overlay for an AppConfig (or the built-in k8s/ tree)",
        description="With --config: a self-contained kustomize folder (namespace, ServiceAccount, NetworkPolicies, "
                    "PodDisruptionBudget, RayService, API-key Secret generator, and opt-in Components: HF token, "
                    "model-cache PVC, observability). Without: this repository's k8s/ tree from the profiles.",
        epilog=_RENDER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    render.add_argument("--config", metavar="APP_YAML", help="AppConfig YAML file (AppConfig.from_file)")
    render.add_argument("--image", help="image of the Ray pods (default: llmserve-nb:0.1.0-gpu or -cpu, by num_gpus)")
    render.add_argument("--model", metavar="HF_ID_OR_PATH", help="overrides engine.model_source of the config")
    render.add_argument("--namespace", help="namespace the kustomization sets (default: llmserve)")
    render.add_argument("--name", help="RayService name (default: the app's name)")
    render.add_argument("--out", metavar="DIR", help="output folder (default without --config: k8s)")
    _add_crd_options(render)
    render.set_defaults(func=_cmd_render, parser=render)

    check = sub.add_parser(
        "check", help="fail with a diff when the k8s/ tree differs from a fresh render",
        epilog="example:\n  llmserve-nb k8s check --out k8s", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--out", default="k8s", metavar="DIR", help="the rendered tree (default: k8s)")
    check.set_defaults(func=_cmd_check, parser=check)

    validate = sub.add_parser(
        "validate", help="validate manifests against CRDs (a folder or the cluster's) and Kubernetes schemas",
        description="Custom resources against their CRD schemas plus KubeRay's reconcile rules; core kinds with "
                    "kubernetes-validate (strict); kustomizations and the files they name.",
        epilog=_VALIDATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="YAML files or folders")
    _add_crd_options(validate)
    validate.set_defaults(func=_cmd_validate, parser=validate)
