"""`llmserve-nb deploy | status | chat | delete`: the app of an AppConfig file on a running Ray cluster, headless.

The commands take the notebooks' own path (`connect()`, `Cluster.deploy`, the `AppHandle`), so the CLI
does what the notebooks test. Each needs a cluster that outlives it, `--address` (also read from
$LLMSERVE_NB_ADDRESS, then $RAY_DASHBOARD_ADDRESS as `serve deploy` reads it) or `--kuberay`: unlike
`connect()`, there is no embedded default, since a local Ray started by the command would stop when it
exits and take the app with it. Results go to stdout, progress and connection chatter to stderr, so
`status --json` can be piped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from typing import Any, Iterator

from llmserve_nb.config import API_KEY_ENV

__all__ = ["ADDRESS_ENVS", "add_cli"]

ADDRESS_ENVS = ("LLMSERVE_NB_ADDRESS", "RAY_DASHBOARD_ADDRESS")
_NO_TARGET = (
    "no cluster given: pass --address http://HEAD:8265 (the Ray dashboard; or set {envs}) or --kuberay NAME. "
    "There is no embedded default here: a local Ray started by this command would stop when it exits, "
    "taking the app with it"
).format(envs=" or ".join(f"${e}" for e in ADDRESS_ENVS))
_EXAMPLE_ADDRESS = "--address http://head:8265"


def _cluster_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("cluster (--address or --kuberay)")
    group.add_argument("--address", metavar="URL",
                       help=f"the cluster's Ray dashboard, http(s)://HOST:8265 (ray://HOST:10001 is mapped to it); "
                            f"default ${ADDRESS_ENVS[0]}, then ${ADDRESS_ENVS[1]}")
    group.add_argument("--kuberay", metavar="NAME", help="a KubeRay RayCluster or RayService, found through the "
                       "Kubernetes API (kubeconfig or the pod's service account), reached by kubectl port-forward "
                       "from outside the cluster")
    group.add_argument("--namespace", metavar="NS", help="namespace of --kuberay (default: the context's)")
    group.add_argument("--context", metavar="CTX", help="kubeconfig context for --kuberay")
    group.add_argument("--serve-url", metavar="URL", help="Serve's HTTP proxy, when it is not on the dashboard's "
                       "host at port 8000 (--address only)")
    group.add_argument("--token", metavar="T", help="Ray auth token (default: $RAY_AUTH_TOKEN, then "
                       "~/.ray/auth_token; with --kuberay the cluster's auth Secret)")
    return common


def _parser(subparsers, name: str, summary: str, examples: str, common: argparse.ArgumentParser
            ) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".", parents=[common],
                              epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(parser=p)
    return p


def add_cli(subparsers) -> None:
    common = _cluster_options()
    d = _parser(subparsers, "deploy", "deploy (or update in place) the app of an AppConfig YAML/JSON file",
                f"  llmserve-nb deploy app.yaml {_EXAMPLE_ADDRESS}\n"
                "  llmserve-nb deploy app.yaml --kuberay llm-notebook --namespace llm --name qwen\n"
                "  # a stock rayproject/ray cluster: ship the package, have Ray install the rest\n"
                f"  llmserve-nb deploy app.yaml {_EXAMPLE_ADDRESS} --pip serve\n"
                "  LLMSERVE_NB_ADDRESS=http://head:8265 llmserve-nb deploy app.yaml --no-wait\n"
                "\napp.yaml holds AppConfig fields, e.g.\n"
                "  name: qwen\n  route_prefix: /qwen\n  engine: {model_source: Qwen/Qwen2.5-0.5B-Instruct}\n"
                "  deployment: {num_replicas: 2, num_gpus: 1}\n", common)
    d.add_argument("config", metavar="APP_FILE", help="AppConfig as YAML (.yaml/.yml) or JSON")
    d.add_argument("--name", help="the Serve application's name (default: the file's `name`, else 'llm')")
    d.add_argument("--ship-package", action=argparse.BooleanOptionalAction, default=None,
                   help="upload this install's llmserve_nb to the cluster with the app (runtime_env py_modules), so "
                        "a stock Ray image runs it (default: yes); --no-ship-package relies on the cluster's image")
    d.add_argument("--pip", action="append", metavar="REQ",
                   help="have Ray install the replicas' Python dependencies on each node: 'serve' (this package's "
                        "[serve] extra without Ray), or requirements, repeated (default: none, the image has them)")
    d.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait until Serve runs the app and its route answers (default: wait)")
    d.add_argument("--timeout", type=float, default=900.0, metavar="S", help="how long to wait (default 900)")
    d.set_defaults(func=_cmd_deploy)

    s = _parser(subparsers, "status", "the cluster's Serve applications: status, URL, deployments and replicas",
                f"  llmserve-nb status {_EXAMPLE_ADDRESS}\n"
                f"  llmserve-nb status llm {_EXAMPLE_ADDRESS} --json | jq '.[0].status'\n", common)
    s.add_argument("app", nargs="?", metavar="APP", help="only this application")
    s.add_argument("--json", action="store_true", help="print JSON (a list of applications) instead of a table")
    s.set_defaults(func=_cmd_status)

    c = _parser(subparsers, "chat", "send one chat turn to a deployed app and print the answer",
                f"  llmserve-nb chat \"What is the capital of France?\" {_EXAMPLE_ADDRESS}\n"
                f"  echo 'Write a haiku' | llmserve-nb chat - --app qwen --stream {_EXAMPLE_ADDRESS}\n", common)
    c.add_argument("prompt", metavar="PROMPT", help="the user message; '-' reads it from stdin")
    c.add_argument("--app", default="llm", help="the Serve application (default: llm)")
    c.add_argument("--api-key", metavar="KEY", help=f"the app's API key (default: ${API_KEY_ENV})")
    c.add_argument("--max-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default 128)")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    c.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    c.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="most seconds to wait for the answer (streaming: for each chunk); default 120")
    c.set_defaults(func=_cmd_chat)

    x = _parser(subparsers, "delete", "delete one Serve application; the cluster's other apps keep running",
                f"  llmserve-nb delete qwen {_EXAMPLE_ADDRESS}\n", common)
    x.add_argument("app", metavar="APP", help="the Serve application's name")
    x.add_argument("--ignore-not-found", action="store_true", help="succeed when the app is not deployed")
    x.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="how long to wait for it to go (default 120)")
    x.set_defaults(func=_cmd_delete)


# ---- shared ----------------------------------------------------------------------------------------
def _target(args: argparse.Namespace) -> dict[str, Any]:
    """`connect()`'s arguments for the cluster the command line names; a usage error (exit 2) unless it names one."""
    if args.kuberay and args.address:
        args.parser.error("give --address or --kuberay, not both")
    if args.kuberay:
        return {"kuberay": args.kuberay, "namespace": args.namespace, "context": args.context, "token": args.token}
    address = args.address or next((os.environ[e] for e in ADDRESS_ENVS if os.environ.get(e)), None)
    if not address:
        args.parser.error(_NO_TARGET)
    return {"address": address, "serve_url": args.serve_url, "token": args.token}


@contextmanager
def _connected(target: dict[str, Any]) -> Iterator[Any]:
    from llmserve_nb.cluster import connect

    # connect() reports KubeRay readiness and the port-forward on stdout; here stdout carries results only.
    with redirect_stdout(sys.stderr):
        cluster = connect(**target)
    try:
        yield cluster
    finally:
        cluster.close()  # the port-forward, if any; never the apps


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _no_app(name: str, apps: dict[str, Any]) -> Exception:
    from llmserve_nb.cluster import ClusterError

    return ClusterError(f"no Serve application {name!r} on this cluster (deployed: {', '.join(sorted(apps)) or 'none'})")


def _load_config(path: str, name: str | None):
    import yaml

    from llmserve_nb.config import AppConfig, ConfigError

    try:
        config = AppConfig.from_file(path)
        return config.with_overrides(name=name) if name else config
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, yaml.YAMLError) as e:  # not YAML / JSON at all
        raise ConfigError(f"{path} is not a valid AppConfig file: {e}") from None


def _url(serve_url: str, route_prefix: str | None) -> str:
    return serve_url + (route_prefix or "/").rstrip("/")


# ---- commands ----------------------------------------------------------------------------------------
def _cmd_deploy(args: argparse.Namespace) -> int:
    target = _target(args)
    config = _load_config(args.config, args.name)
    t0 = time.monotonic()
    with _connected(target) as cluster:
        pip = "serve" if args.pip == ["serve"] else args.pip
        handle = cluster.deploy(config, ship_package=args.ship_package, pip=pip, wait=args.wait,
                                timeout_s=args.timeout, progress=_progress)
        status = handle.status().status
        handle.close()
        via = f" (through {cluster.how}, open while this command ran)" if cluster.kind == "kuberay" else ""
        print(f"{handle.name}: {status} in {time.monotonic() - t0:.0f}s, model {handle.model}")
        print(f"  {handle.base_url}/v1{via}")
    return 0


def _rows(cluster, only: str | None) -> list[dict[str, Any]]:
    apps = cluster.app_statuses()
    if only is not None and only not in apps:
        raise _no_app(only, apps)
    return [
        {
            "app": app.name,
            "status": app.status,
            "url": _url(cluster.serve_url, app.route_prefix),
            "message": app.message,
            "deployments": [
                {"name": dep.name, "status": dep.status, "running_replicas": len(dep.running),
                 "target_replicas": dep.target_replicas, "replicas": [r.state for r in dep.replicas],
                 "message": dep.message}
                for dep in app.deployments.values()
            ],
        }
        for app in apps.values() if only in (None, app.name)
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("APP", "STATUS", "URL", "DEPLOYMENT", "DEPLOYMENT STATUS", "REPLICAS")
    lines = []
    for app in rows:
        for dep in app["deployments"] or [{"name": "-", "status": "-", "running_replicas": 0, "target_replicas": None}]:
            target = "?" if dep["target_replicas"] is None else dep["target_replicas"]
            lines.append((app["app"], app["status"], app["url"], dep["name"], dep["status"],
                          f"{dep['running_replicas']}/{target} running"))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *lines]]
    # Serve's own words for an app that is not running: the reason a deploy failed.
    text += [f"{app['app']}: {app['message'][-1000:]}" for app in rows if app["message"] and app["status"] != "RUNNING"]
    return "\n".join(text)


def _cmd_status(args: argparse.Namespace) -> int:
    with _connected(_target(args)) as cluster:
        rows = _rows(cluster, args.app)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            print(_table(rows))
        else:
            print(f"no Serve applications on {cluster.dashboard_url}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    target = _target(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with _connected(target) as cluster:
        handle = cluster.app(args.app)
        handle.request_timeout_s = args.timeout
        if args.api_key:
            handle.api_key = args.api_key
        params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        try:
            if args.stream:
                for chunk in handle.stream_chat(prompt, **params):
                    print(chunk, end="", flush=True)
                print()
            else:
                print(handle.chat(prompt, **params))
        finally:
            handle.close()
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    with _connected(_target(args)) as cluster:
        apps = cluster.app_statuses()
        if args.app not in apps:
            if not args.ignore_not_found:
                raise _no_app(args.app, apps)
            print(f"{args.app}: not deployed")
            return 0
        cluster.delete(args.app, timeout_s=args.timeout)
    print(f"{args.app}: deleted")
    return 0
