"""Where the model runs: connect to a Ray cluster and deploy apps to it through the Serve REST API.

`connect()` with no arguments starts (or reuses) an embedded local Ray; `connect(address=...)`
attaches to a running cluster's dashboard. Either way, deploys go through `PUT
/api/serve/applications/` — the same declarative path KubeRay uses — so the local default
exercises exactly the code that drives a remote cluster. Ray Client is never used.
"""
from __future__ import annotations

import html
import logging
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import httpx

from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig, ConfigError, config_of_application

__all__ = ["AppHandle", "Cluster", "ClusterError", "DeployError", "connect"]

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
SERVE_PORT = 8000


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused us, or is not what we expected."""


class DeployError(ClusterError):
    """Serve could not deploy the application (or did not finish in time)."""


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens there, else an ephemeral port (so tests and notebooks can coexist)."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ClusterError("no free TCP port on 127.0.0.1")


def read_ray_token() -> str | None:
    """The Ray auth token the way Ray itself finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() and path.read_text().strip() else None


class Cluster:
    """A Ray cluster reached through its dashboard (REST) and its Serve HTTP proxy."""

    def __init__(
        self,
        dashboard_url: str,
        serve_url: str,
        *,
        kind: str,
        how: str,
        token: str | None = None,
        serve_host: str = "0.0.0.0",
        on_close: Callable[[], None] | None = None,
        timeout_s: float = 30.0,
    ):
        self.dashboard_url = dashboard_url.rstrip("/")
        self.serve_url = serve_url.rstrip("/")
        self.kind = kind
        self.how = how
        self.serve_host = serve_host
        self._on_close = on_close
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # A short connect timeout: an address that never answers should fail fast, not after 30 s.
        self._http = httpx.Client(base_url=self.dashboard_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0))
        self.handles: dict[str, AppHandle] = {}
        self.managed_by: str | None = None  # name of the RayService whose operator owns Serve here

    # ---- REST ------------------------------------------------------------------------------
    def _api(self, method: str, path: str, **kw) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.dashboard_url} ({type(e).__name__}: {e}); "
                "is the cluster running and the address right?"
            ) from None
        if r.status_code in (401, 403):
            raise ClusterError(
                f"the Ray dashboard at {self.dashboard_url} rejected our credentials (HTTP {r.status_code}): "
                "the cluster uses token auth; pass token=..., set RAY_AUTH_TOKEN, or for KubeRay the auth Secret"
            )
        if r.status_code >= 400:
            raise ClusterError(f"{method} {path} failed with HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content and "json" in r.headers.get("content-type", "") else r.text

    def version(self) -> dict[str, Any]:
        return self._api("GET", "/api/version")

    def check_version(self) -> None:
        """Fail early on Ray version skew: the serve config and pickled objects must match."""
        import ray

        remote = self.version().get("ray_version")
        if remote and remote != ray.__version__:
            raise ClusterError(
                f"Ray version skew: the cluster runs ray {remote}, this kernel has ray {ray.__version__}; "
                f"install ray[serve]=={remote} here or use a cluster image with ray {ray.__version__}"
            )

    def nodes(self) -> list[dict[str, Any]]:
        """Alive and dead nodes with their resources (from the state API)."""
        data = self._api("GET", "/api/v0/nodes", params={"limit": 1000, "detail": "true"})
        rows = []
        for n in data["data"]["result"]["result"]:
            res = n.get("resources_total", {})
            rows.append({
                "node_id": n["node_id"][:12],
                "ip": n.get("node_ip"),
                "head": n.get("is_head_node", False),
                "state": n.get("state"),
                "CPU": res.get("CPU", 0),
                "GPU": res.get("GPU", 0),
                "memory_GiB": round(res.get("memory", 0) / 2**30, 1),
                "custom": {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                           and not k.startswith("node:")},
            })
        return rows

    def serve_details(self) -> dict[str, Any]:
        return self._api("GET", "/api/serve/applications/")

    def applications(self) -> list[dict[str, Any]]:
        """One row per Serve application: status, replicas by state and node."""
        rows = []
        for name, app in (self.serve_details().get("applications") or {}).items():
            for dname, dep in (app.get("deployments") or {}).items():
                replicas = dep.get("replicas") or []
                rows.append({
                    "app": name,
                    "route_prefix": app.get("route_prefix"),
                    "app_status": app.get("status"),
                    "deployment": dname,
                    "deployment_status": dep.get("status"),
                    "target_replicas": dep.get("target_num_replicas"),
                    "running_replicas": sum(r.get("state") == "RUNNING" for r in replicas),
                    "nodes": sorted({(r.get("node_id") or "")[:12] for r in replicas}),
                    "message": app.get("message") or dep.get("message") or "",
                })
        return rows

    # ---- deploy ----------------------------------------------------------------------------
    def app(self, name: str = "llm") -> AppHandle:
        """A handle to an application that already runs, e.g. one a RayService deployed."""
        apps = self.serve_details().get("applications") or {}
        if name not in apps:
            raise ClusterError(f"no Serve application {name!r} on this cluster (running: {sorted(apps) or 'none'})")
        try:
            config = config_of_application(apps[name].get("deployed_app_config") or {"name": name})
        except ConfigError as e:
            raise ClusterError(f"application {name!r} is not an llmserve_nb app: {e}") from None
        handle = AppHandle(self, config)
        self.handles.setdefault(name, handle)
        return handle

    def deploy(
        self,
        config: AppConfig | None = None,
        *,
        wait: bool = True,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = print,
    ) -> AppHandle:
        """Deploy (or update in place) one application; other applications on the cluster are kept."""
        config = config or AppConfig()
        if self.managed_by is not None:
            raise DeployError(
                f"this cluster belongs to RayService {self.managed_by!r}: KubeRay reconciles its serveConfigV2 and "
                "would revert a deploy made here. Use cluster.app(name) to work with the app it runs, change the "
                "RayService (llmserve-nb render-k8s), or deploy to a RayCluster instead"
            )
        details = self.serve_details()
        others = [
            app["deployed_app_config"]
            for name, app in (details.get("applications") or {}).items()
            if name != config.name and app.get("deployed_app_config")
        ]
        for other in others:
            if other.get("route_prefix") == config.route_prefix:
                raise DeployError(
                    f"route_prefix {config.route_prefix!r} is taken by application {other['name']!r}; "
                    "give this app another name and route_prefix"
                )
        body = config.to_serve_config(http_host=self.serve_host, http_port=urlparse(self.serve_url).port or 80)
        if details.get("http_options"):
            # Serve's proxy options are fixed once it runs; resend them unchanged.
            body["http_options"] = {k: details["http_options"][k] for k in ("host", "port") if k in details["http_options"]}
        body["applications"] = others + body["applications"]
        self._api("PUT", "/api/serve/applications/", json=body)
        handle = AppHandle(self, config)
        self.handles[config.name] = handle
        if wait:
            handle.wait_running(timeout_s=timeout_s, progress=progress)
        return handle

    def delete(self, app_name: str, timeout_s: float = 120.0) -> None:
        """Remove one application; shuts Serve down when it was the last one."""
        details = self.serve_details()
        apps = details.get("applications") or {}
        if app_name not in apps:
            return
        rest = [a["deployed_app_config"] for n, a in apps.items() if n != app_name and a.get("deployed_app_config")]
        if rest:
            self._api("PUT", "/api/serve/applications/", json={"applications": rest})
        else:
            self._api("DELETE", "/api/serve/applications/")
        deadline = time.monotonic() + timeout_s
        while app_name in (self.serve_details().get("applications") or {}):
            if time.monotonic() > deadline:
                raise DeployError(f"application {app_name!r} still present {timeout_s:.0f}s after delete")
            time.sleep(0.5)
        self.handles.pop(app_name, None)

    def shutdown(self) -> None:
        """Delete the apps deployed through this object; stop the embedded Ray if this process started it."""
        for name in list(self.handles):
            try:
                self.delete(name)
            except ClusterError as e:
                log.warning("could not delete %s: %s", name, e)
        self._http.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _repr_html_(self) -> str:
        try:
            nodes = self.nodes()
            apps = self.applications()
        except ClusterError as e:
            return f"<b>Ray cluster</b> at {html.escape(self.dashboard_url)}: <span style='color:red'>{html.escape(str(e))}</span>"
        return (
            f"<b>Ray cluster</b> ({html.escape(self.kind)}, {html.escape(self.how)})<br>"
            f"dashboard <a href='{self.dashboard_url}'>{self.dashboard_url}</a> · serve {html.escape(self.serve_url)}"
            + _html_table(nodes, "nodes") + _html_table(apps, "Serve applications")
        )

    def __repr__(self) -> str:
        return f"Cluster(kind={self.kind!r}, dashboard_url={self.dashboard_url!r}, serve_url={self.serve_url!r})"


def _html_table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"<p><i>no {html.escape(title)}</i></p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<p><b>{html.escape(title)}</b></p><table><tr>{head}</tr>{body}</table>"


class AppHandle:
    """A deployed application: its URL, a few convenience calls, status and teardown."""

    def __init__(self, cluster: Cluster, config: AppConfig, api_key: str | None = None):
        self.cluster = cluster
        self.config = config
        self.name = config.name
        self.model = config.engine.model_name
        self.base_url = cluster.serve_url + config.route_prefix.rstrip("/")
        self.api_key = api_key or os.environ.get("LLMSERVE_NB_API_KEY") or None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=300.0)

    # ---- lifecycle -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        app = (self.cluster.serve_details().get("applications") or {}).get(self.name)
        if app is None:
            return {"app": self.name, "status": "NOT_DEPLOYED", "message": "", "deployments": {}}
        return {
            "app": self.name,
            "status": app.get("status"),
            "message": app.get("message", ""),
            "deployments": {
                d: {
                    "status": dep.get("status"),
                    "target_replicas": dep.get("target_num_replicas"),
                    "replica_states": [r.get("state") for r in dep.get("replicas") or []],
                    "message": dep.get("message", ""),
                    "user_config": (dep.get("deployment_config") or {}).get("user_config"),
                }
                for d, dep in (app.get("deployments") or {}).items()
            },
            "deployed_app_config": app.get("deployed_app_config") or {},
        }

    def _is_current(self, st: dict[str, Any]) -> bool:
        """Serve reports the config it is running; RUNNING counts only once it is *our* config."""
        want = self.config.to_application()
        got = st.get("deployed_app_config") or {}
        got_dep = {d.get("name"): d for d in got.get("deployments") or []}.get(DEPLOYMENT_NAME, {})
        return got.get("args") == want["args"] and got_dep.get("user_config") == want["deployments"][0]["user_config"]

    def wait_running(self, timeout_s: float = 900.0, progress: Callable[[str], None] | None = print) -> None:
        t0 = time.monotonic()
        last = None
        while True:
            st = self.status()
            current = self._is_current(st)
            line = f"{st['status']}" + (f": {st['message']}" if st["message"] else "")
            if progress and line != last:
                progress(f"[{time.monotonic() - t0:5.1f}s] {self.name}: {line[:300]}")
                last = line
            if current and st["status"] == "RUNNING":
                break
            if current and st["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"application {self.name!r} is {st['status']}: {st['message']}")
            if time.monotonic() - t0 > timeout_s:
                raise DeployError(
                    f"application {self.name!r} not RUNNING after {timeout_s:.0f}s (last status {line[:500]}); "
                    "check cluster resources (num_cpus/num_gpus per replica) and the Serve logs"
                )
            time.sleep(1.0)
        # The proxy learns routes asynchronously; don't hand back a URL that still 404s.
        while time.monotonic() - t0 <= timeout_s:
            try:
                if self._http.get("/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise DeployError(f"{self.base_url}/health did not answer within {timeout_s:.0f}s")

    def reconfigure(self, **batching: Any) -> None:
        """Change batching live (Serve user_config → replica.reconfigure); replicas are not restarted."""
        self.update(self.config.with_overrides(**{f"batching.{k}": v for k, v in batching.items()}))

    def update(self, config: AppConfig, timeout_s: float = 900.0, progress: Callable[[str], None] | None = None) -> None:
        """Redeploy with another config of the same app (e.g. autoscaling bounds); Serve applies the diff."""
        if config.name != self.name:
            raise ValueError(f"config is for app {config.name!r}, this handle is {self.name!r}")
        self.cluster.deploy(config, wait=False)
        self.config = config
        self.cluster.handles[self.name] = self
        self.wait_running(timeout_s=timeout_s, progress=progress)

    def shutdown(self) -> None:
        self.cluster.delete(self.name)
        self._http.close()

    # ---- calls -----------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._http.post(path, json=body)
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:500]
            raise ClusterError(f"POST {self.base_url}{path} -> HTTP {r.status_code}: {msg}")
        return r.json()

    @staticmethod
    def _messages(content: str | list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": "user", "content": content}] if isinstance(content, str) else content

    def chat(self, content: str | list[dict[str, str]], **params: Any) -> str:
        """One chat turn; `params` are OpenAI sampling fields (max_tokens, temperature, stop, seed...)."""
        params.setdefault("temperature", 0.0)
        body = {"model": self.model, "messages": self._messages(content), **params}
        return self._post("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def complete(self, prompt: str, **params: Any) -> str:
        params.setdefault("temperature", 0.0)
        return self._post("/v1/completions", {"model": self.model, "prompt": prompt, **params})["choices"][0]["text"]

    def stream_chat(self, content: str | list[dict[str, str]], **params: Any) -> Iterator[str]:
        """Yield text deltas as the server streams them (SSE)."""
        import json

        params.setdefault("temperature", 0.0)
        body = {"model": self.model, "messages": self._messages(content), "stream": True, **params}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise ClusterError(f"stream failed: HTTP {r.status_code}: {r.text[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise ClusterError(f"stream failed: {data['error']['message']}")
                for choice in data.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        yield choice["delta"]["content"]

    def openai_client(self):
        """The official `openai` client pointed at this app."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "not-needed", max_retries=0)

    def stats(self) -> dict[str, Any]:
        """Batching statistics of the replica that answers (each replica keeps its own)."""
        r = self._http.get("/stats")
        r.raise_for_status()
        return r.json()

    def burst(self, n: int = 16, max_tokens: int = 32, prompt: str = "Tell me a story about a lighthouse.") -> dict[str, Any]:
        """Send `n` completions at once and report the batches the replica formed for them.

        The histogram is the difference of the replica's counters before and after, so it is exact
        for a single replica and quiet traffic (each replica keeps its own counters).
        """
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> float:
            t0 = time.perf_counter()
            self.complete(f"{prompt} ({i})", max_tokens=max_tokens, ignore_eos=True)
            return time.perf_counter() - t0

        before = self.stats()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            latencies = sorted(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
        after = self.stats()
        hist = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
        hist = {k: v for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])) if v}
        return {
            "requests": n,
            "wall_s": round(wall, 3),
            "output_tok_per_s": round(n * max_tokens / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_max_s": round(latencies[-1], 3),
            "batch_size_histogram": hist,
            "max_batch_size_seen": max((int(k) for k in hist), default=0),
        }

    def _repr_html_(self) -> str:
        try:
            st = self.status()
        except ClusterError as e:
            st = {"status": f"unknown ({e})", "deployments": {}}
        dep = st["deployments"].get(DEPLOYMENT_NAME, {})
        rows = [
            ("app", self.name), ("model", self.model), ("base_url", self.base_url),
            ("status", st["status"]), ("replicas", ", ".join(dep.get("replica_states", [])) or "-"),
            ("batching", self.config.batching.model_dump()),
            ("resources / replica", self.config.ray_actor_options()),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    def __repr__(self) -> str:
        return f"AppHandle(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"


# ---- connect -------------------------------------------------------------------------------
_local: Cluster | None = None


def _start_local(num_cpus: int | None, dashboard_port: int | None, serve_port: int | None) -> Cluster:
    import ray

    global _local
    if _local is not None and ray.is_initialized():
        return _local
    sport = serve_port or _free_port(SERVE_PORT)
    for attempt in range(3):
        # Between our probe and the dashboard's bind another process can take the port: retry elsewhere.
        dport = dashboard_port or _free_port(DASHBOARD_PORT if attempt == 0 else 0)
        try:
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
            if dashboard_port or "address already in use" not in str(e) or attempt == 2:
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


def _connect_kuberay(
    name: str, namespace: str | None, kind: str, token: str | None, token_secret: str | None,
    port_forward: str, timeout_s: float, check_version: bool, api_client: Any,
) -> Cluster:
    from llmserve_nb.kuberay import KubeRayCluster, check_version_skew

    kr = KubeRayCluster(name, namespace, kind=kind, api_client=api_client)  # type: ignore[arg-type]
    kr.wait_ready(timeout_s=timeout_s, progress=print)
    if check_version:
        check_version_skew(*kr.versions())
    token = token or kr.auth_token(token_secret)
    conn = kr.connect(port_forward=port_forward)  # type: ignore[arg-type]
    print(f"connected to {kr.namespace}/{conn.cluster_name} via {conn.how}: dashboard {conn.dashboard_url}")
    if conn.serve_url is None:
        conn.close()
        raise ClusterError(f"head service of {kr.namespace}/{conn.cluster_name} exposes no 'serve' port (8000)")
    cluster = Cluster(conn.dashboard_url, conn.serve_url, kind="kuberay", how=conn.how, token=token,
                      on_close=conn.close)
    if kr.resource()[0] == "RayService":
        cluster.managed_by = name
    try:
        cluster.version()
    except ClusterError:
        conn.close()
        raise
    return cluster


def connect(
    address: str | None = None,
    *,
    kuberay: str | None = None,
    namespace: str | None = None,
    kind: str = "auto",
    serve_url: str | None = None,
    token: str | None = None,
    token_secret: str | None = None,
    port_forward: str = "auto",
    num_cpus: int | None = None,
    dashboard_port: int | None = None,
    serve_port: int | None = None,
    timeout_s: float = 600.0,
    check_version: bool = True,
    api_client: Any = None,
) -> Cluster:
    """Connect to where the model runs.

    - `connect()`: start (or reuse) an embedded Ray in this process, dashboard on 127.0.0.1.
    - `connect(address="http://host:8265")`: an existing cluster's dashboard; Serve at `serve_url`
      (default: same host, port 8000). `"ray://host:10001"` is mapped to that host's dashboard:
      deploys go through the Serve REST API, not Ray Client.
    - `connect(kuberay="name", namespace="ns")`: a KubeRay RayCluster or RayService (its active
      cluster), read through the Kubernetes API; waits until ready, then reaches the head service
      by in-cluster DNS inside a pod, or through a port-forward outside. Token auth: `token=`,
      `$RAY_AUTH_TOKEN`, or `token_secret=` (a Secret in that namespace, key `auth_token`).
    """
    if address is not None and kuberay is not None:
        raise ClusterError("give either address= or kuberay=, not both")
    if kuberay is not None:
        return _connect_kuberay(kuberay, namespace, kind, token, token_secret, port_forward, timeout_s,
                                check_version, api_client)
    if address is None:
        return _start_local(num_cpus, dashboard_port, serve_port)
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
    cluster = Cluster(dashboard, serve, kind="address", how=how, token=token or read_ray_token())
    cluster.version()  # fail here, clearly, if nothing answers
    if check_version:
        cluster.check_version()
    return cluster
