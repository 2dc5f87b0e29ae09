"""`connect()` and the three places it reaches: an embedded local Ray, a cluster's dashboard address, KubeRay.

Each target only works out the dashboard and Serve URLs and the token (and starts Ray or a
port-forward where it must), then hands them to the same `Cluster`, so nothing after connecting
depends on the target. The module is called `targets`, not `connect`, so that the package's
`connect` function does not hide a submodule of the same name from imports and patch targets.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from llmserve_nb.cluster.client import Cluster
from llmserve_nb.cluster.errors import ClusterError
from llmserve_nb.cluster.fastpath import embedded_env, started_with
from llmserve_nb.cluster.ports import free_port

DASHBOARD_PORT = 8265
SERVE_PORT = 8000
# Ray 2.60 logs this on every new local cluster when RAY_AUTH_MODE is unset: it turned token auth on, the
# secure default the embedded target keeps and sends the token for. A notebook user has nothing to do about
# it, and it shows in red under every connect cell. Only this message is dropped: the warning that auth is
# *disabled* still shows.
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_QUIET_TOKEN_AUTH_NOTICE = _DropMessage(_TOKEN_AUTH_NOTICE)


def quiet_token_auth_notice() -> None:
    """Drop Ray's "token authentication is enabled" notice from this process's log (idempotent)."""
    logging.getLogger(_TOKEN_AUTH_LOGGER).addFilter(_QUIET_TOKEN_AUTH_NOTICE)


def read_ray_token() -> str | None:
    """The Ray auth token of this machine, found the way Ray finds it: $RAY_AUTH_TOKEN, else the file
    $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. None when there is none.

    `connect()` uses it for the local and address targets only when no `token=` is given; a KubeRay
    cluster's token comes from its own auth Secret instead (see `connect`).
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = path.read_text().strip() if path.is_file() else ""
    return token or None


_local: Cluster | None = None


def _start_local(num_cpus: int | None, dashboard_port: int | None, serve_port: int | None) -> Cluster:
    # The embedded Ray runs the replicas in this environment's Python, so it needs the whole replica side;
    # a client-only install ([notebook] or the core) gets told which extra, not an ImportError.
    absent = [name for name in ("ray", "torch", "transformers") if importlib.util.find_spec(name) is None]
    if absent:
        raise ClusterError(
            f"the embedded local Ray (connect() with no address or kuberay) runs the model in this Python, which "
            f"lacks {', '.join(absent)}: pip install 'llmserve-nb[serve]'. Or connect to a running cluster: "
            "connect(address='http://head:8265') or connect(kuberay='<name>', namespace=...)")
    import ray

    global _local
    if _local is not None and ray.is_initialized():
        return _local
    sport = serve_port or free_port(SERVE_PORT)
    quiet_token_auth_notice()
    for attempt in range(3):
        # Between our probe and the dashboard's bind another process can take the port: retry elsewhere.
        # An ephemeral port unless one is asked for: a busy 8265 surfaces only after Ray's whole dashboard
        # start-up timeout.
        dport = dashboard_port or free_port(0)
        try:
            # Serve's fast path is the cluster's environment, read by each Ray process as it starts.
            with started_with(embedded_env()):
                ctx = ray.init(
                    # "local" always starts a fresh cluster; plain ray.init() would silently attach to
                    # whatever `ray start` left running on this machine.
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dport,
                    namespace="llmserve_nb",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                )
            break
        except Exception as e:
            ray.shutdown()
            # A port taken between pick and bind, or a node slow to come up on a loaded machine (Ray gives
            # its raylet a fixed 30 s), is worth another try; anything else is not.
            transient = "address already in use" in str(e) or "timed out during startup" in str(e)
            if not transient or (dashboard_port and "timed out" not in str(e)) or attempt == 2:
                raise ClusterError(f"could not start the embedded Ray: {str(e)[-800:]}") from None
    # Ray 2.60 turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise, and
    # records its choice in os.environ (inherited by workers and `ray start --address` children).
    # Read the outcome rather than guessing, and send the same token Ray itself uses.
    token = read_ray_token() if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else None
    dashboard = f"http://{ctx.dashboard_url}" if not ctx.dashboard_url.startswith("http") else ctx.dashboard_url

    def stop() -> None:
        global _local
        ray.shutdown()
        _local = None

    _local = Cluster(dashboard, f"http://127.0.0.1:{sport}", kind="local", how="embedded local Ray (this kernel)",
                     token=token, serve_host="127.0.0.1", on_close=stop)
    _wait_dashboard(_local)
    return _local


def _wait_dashboard(cluster: Cluster, timeout_s: float = 60.0) -> None:
    # The dashboard's HTTP server comes up a moment after ray.init() returns.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cluster.version()
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _address_cluster(address: str, serve_url: str | None, dashboard_port: int | None, serve_port: int | None,
                     token: str | None) -> Cluster:
    url = urlparse(address if "://" in address else f"http://{address}")
    if url.scheme not in ("http", "https", "ray"):
        raise ClusterError(f"address {address!r}: use http(s)://host:8265 (dashboard) or ray://host:10001")
    if not url.hostname:
        raise ClusterError(f"address {address!r} has no host")
    if url.scheme == "ray":
        dashboard = f"http://{url.hostname}:{dashboard_port or DASHBOARD_PORT}"
        how = f"ray:// address mapped to the dashboard REST API at {dashboard}"
    else:
        dashboard = f"{url.scheme}://{url.hostname}:{url.port or dashboard_port or DASHBOARD_PORT}"
        how = "dashboard REST API"
    serve = serve_url or f"http://{url.hostname}:{serve_port or SERVE_PORT}"
    return Cluster(dashboard, serve, kind="address", how=how, token=token or read_ray_token())


def _kuberay_cluster(
    name: str, namespace: str | None, kind: str, context: str | None, token: str | None, token_secret: str | None,
    timeout_s: float, api_client: Any,
) -> tuple[Cluster, tuple[str | None, str | None]]:
    """The Cluster behind a KubeRay RayCluster/RayService, and the (ray, python) versions its spec declares."""
    from llmserve_nb.cluster.kuberay import KubeRayCluster

    kr = KubeRayCluster(name, namespace, kind=kind, api_client=api_client, context=context)  # type: ignore[arg-type]
    kr.wait_ready(timeout_s=timeout_s, progress=print)
    raycluster = kr.raycluster()
    if token is None:
        token = kr.auth_token(token_secret, raycluster)
    conn = kr.connect()
    if conn.serve_url is None:
        conn.close()
        raise ClusterError(f"head service of {kr.namespace}/{conn.cluster_name} exposes no 'serve' port (8000)")
    print(f"connected to {kr.namespace}/{conn.cluster_name} via {conn.how}: dashboard {conn.dashboard_url}")
    cluster = Cluster(conn.dashboard_url, conn.serve_url, kind="kuberay", how=conn.how, token=token,
                      on_close=conn.close)
    if kr.resource()[0] == "RayService":
        cluster.managed_by = name
    return cluster, (conn.ray_version, conn.python_version)


def connect(
    address: str | None = None,
    *,
    target: Literal["local", "address", "kuberay"] | None = None,
    kuberay: str | None = None,
    namespace: str | None = None,
    kind: Literal["auto", "RayCluster", "RayService"] = "auto",
    context: str | None = None,
    serve_url: str | None = None,
    token: str | None = None,
    token_secret: str | None = None,
    num_cpus: int | None = None,
    dashboard_port: int | None = None,
    serve_port: int | None = None,
    timeout_s: float = 600.0,
    check_version: bool = True,
    api_client: Any = None,
) -> Cluster:
    """Connect to where the model runs.

    `target` says where; None picks it from the arguments (`kuberay=` → "kuberay", `address=` →
    "address", neither → "local"). With an explicit target the other targets' arguments are ignored,
    so one notebook parameters cell can hold them all.

    - "local": start (or reuse) an embedded Ray in this process, dashboard on 127.0.0.1.
    - "address": an existing cluster's dashboard, `address="http://host:8265"`; Serve at `serve_url`
      (default: same host, port 8000). `"ray://host:10001"` is mapped to that host's dashboard:
      deploys go through the Serve REST API, not Ray Client.
    - "kuberay": a KubeRay RayCluster or RayService (its active cluster) named `kuberay` in
      `namespace`, read through the Kubernetes API (`api_client`, else the kubeconfig `context`, or
      the pod's service account); waits until it is ready, then reaches the head service by in-cluster
      DNS inside a pod, or outside through `kubectl port-forward` to the same API server.

    Ray token auth, first match wins:
    - address: `token=`, then $RAY_AUTH_TOKEN, then the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
      (`read_ray_token`).
    - local: the token the embedded Ray itself uses, found the same way (`token=` does not apply).
    - kuberay: `token=`, then the cluster's auth Secret, key `auth_token`: `token_secret=` names it,
      else KubeRay's own when the RayCluster spec has `authOptions.mode: token` (see
      `KubeRayCluster.auth_token`). This machine's token is never sent to a KubeRay cluster.

    Unless `check_version=False`, a cluster running another Ray (or, for KubeRay, another Python
    minor, from its image tag) than this kernel is refused with the versions to install.
    """
    if target is None:
        if address is not None and kuberay is not None:
            raise ClusterError("give either address= or kuberay=, not both (or say which with target=)")
        target = "kuberay" if kuberay is not None else "address" if address is not None else "local"
    if target == "local":
        return _start_local(num_cpus, dashboard_port, serve_port)
    if target == "address":
        if not address:
            raise ClusterError("target='address' needs address='http://head:8265' (the cluster's dashboard)")
        cluster, declared = _address_cluster(address, serve_url, dashboard_port, serve_port, token), (None, None)
    elif target == "kuberay":
        if not kuberay:
            raise ClusterError("target='kuberay' needs kuberay='<RayCluster or RayService name>' (and namespace=)")
        cluster, declared = _kuberay_cluster(kuberay, namespace, kind, context, token, token_secret, timeout_s,
                                             api_client)
    else:
        raise ClusterError(f"target={target!r}: use 'local', 'address' or 'kuberay'")
    try:
        cluster.version()  # fail here, clearly, if nothing answers or our token is refused
        if check_version:
            cluster.check_version(cluster_ray=declared[0], cluster_python=declared[1])
    except ClusterError:
        cluster.shutdown()
        raise
    return cluster
