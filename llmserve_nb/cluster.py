"""Where the model runs: connect to a Ray cluster and deploy apps to it through the Serve REST API.

`connect()` picks one of three targets: an embedded local Ray (the default), a running cluster's
dashboard (`address=`), or a KubeRay RayCluster/RayService by name (`kuberay=`). Whatever the target,
deploys go through `PUT /api/serve/applications/`, the same declarative path KubeRay uses, so the
local default exercises exactly the code that drives a remote cluster. Ray Client is never used.

Every HTTP call made here has a timeout, and every failure to reach the cluster or the app is a
`ClusterError` that names the URL and what to check.
"""
from __future__ import annotations

import html
import logging
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlparse

import httpx

from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig, ConfigError, config_of_application

__all__ = ["AppHandle", "Cluster", "ClusterError", "DeployError", "check_version_skew", "connect", "read_ray_token"]

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
SERVE_PORT = 8000
# An address that never answers should fail in seconds, whatever the read timeout of the call.
CONNECT_TIMEOUT_S = 5.0


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


def check_version_skew(
    cluster_ray: str | None, cluster_python: str | None, local_ray: str | None = None, local_python: str | None = None
) -> None:
    """Raise ClusterError when the cluster's Ray (exact) or Python (major.minor) differs from this kernel's.

    The Serve config, pickled objects and Ray's own protocol break across Ray versions, and pickled
    code across Python minors, so `connect()` checks this before anything else. A version the cluster
    does not state (None) is not checked.
    """
    if local_ray is None:
        import ray

        local_ray = ray.__version__
    local_python = local_python or platform.python_version()
    problems = []
    if cluster_ray and cluster_ray != local_ray:
        problems.append(f"the cluster runs ray {cluster_ray}, this kernel has ray {local_ray}")
    if cluster_python and cluster_python.split(".")[:2] != local_python.split(".")[:2]:
        problems.append(f"the cluster runs Python {cluster_python}, this kernel has Python {local_python}")
    if problems:
        raise ClusterError(
            "Ray version skew: " + "; ".join(problems)
            + f". Install the cluster's versions here (`pip install ray[serve]=={cluster_ray or local_ray}`"
            + (f" on Python {cluster_python}" if cluster_python else "")
            + ") or use a cluster image that matches this kernel (connect(check_version=False) skips this check)"
        )


def _same(want: Any, got: Any) -> bool:
    """`got` is `want` as Serve echoes it back: through its schema 2 may come back as 2.0, and a key we
    set to None may be left out."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        keys = {k for k, v in want.items() if v is not None} | {k for k, v in got.items() if v is not None}
        return all(_same(want.get(k), got.get(k)) for k in keys)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(want) == len(got) and all(map(_same, want, got))
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and float(want) == float(got)
    return want == got


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
        self._http = httpx.Client(
            base_url=self.dashboard_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        self.handles: dict[str, AppHandle] = {}
        self.deployed: set[str] = set()  # apps deployed through this object: the only ones shutdown() deletes
        self.managed_by: str | None = None  # name of the RayService whose operator owns Serve here

    # ---- REST ------------------------------------------------------------------------------
    def _api(self, method: str, path: str, refused: type[ClusterError] = ClusterError, **kw) -> Any:
        url = f"{self.dashboard_url}{path}"
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException as e:
            raise ClusterError(
                f"{method} {url}: the Ray dashboard did not answer in time ({type(e).__name__}); "
                "is the head node overloaded, or the port-forward to it stalled?"
            ) from None
        except httpx.TransportError as e:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.dashboard_url} ({type(e).__name__}: {e}); "
                "is the cluster running and the address (or port-forward) right?"
            ) from None
        if r.status_code in (401, 403):
            raise ClusterError(
                f"the Ray dashboard at {self.dashboard_url} rejected our credentials (HTTP {r.status_code}): "
                "the cluster uses token auth; pass token=..., set RAY_AUTH_TOKEN, or for KubeRay the auth Secret"
            )
        if r.status_code >= 400:
            raise refused(f"{method} {url} failed with HTTP {r.status_code}: {r.text[:2000]}")
        if not r.content or "json" not in r.headers.get("content-type", ""):
            return r.text
        try:
            return r.json()
        except ValueError:
            raise ClusterError(f"{method} {url} answered invalid JSON: {r.text[:300]!r}") from None

    def version(self) -> dict[str, Any]:
        return self._api("GET", "/api/version")

    def check_version(self, cluster_python: str | None = None, cluster_ray: str | None = None) -> None:
        """Refuse a Ray/Python version skew. Ray's version is the one the dashboard reports (`cluster_ray`
        only when it reports none); Python's is known only from outside (e.g. a KubeRay image tag)."""
        check_version_skew(self.version().get("ray_version") or cluster_ray, cluster_python)

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

    def metrics_urls(self) -> list[str]:
        """Ray's metrics export endpoint (`http://<node>:<metrics-export-port>/metrics`) of each alive node,
        from the dashboard's node summary. The head is addressed as the dashboard is (e.g. 127.0.0.1)."""
        data = self._api("GET", "/nodes", params={"view": "summary"})
        dashboard_host = urlparse(self.dashboard_url).hostname
        urls = []
        for node in (data.get("data") or {}).get("summary") or []:
            raylet = node.get("raylet") or {}
            port = raylet.get("metricsExportPort")
            if raylet.get("state", "ALIVE") != "ALIVE" or not port:
                continue
            host = dashboard_host if raylet.get("isHeadNode") else raylet.get("nodeManagerAddress") or node.get("ip")
            urls.append(f"http://{host}:{port}/metrics")
        return urls

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
        """A handle to an application that already runs, e.g. one a RayService deployed.

        Attaching does not make the app ours: `shutdown()` leaves it running.
        """
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

    def _refuse_if_managed(self, what: str) -> None:
        if self.managed_by is not None:
            raise DeployError(
                f"cannot {what}: this cluster belongs to RayService {self.managed_by!r}: KubeRay reconciles its "
                "serveConfigV2 and would revert a deploy made here. Use cluster.app(name) to work with the app it "
                "runs, change the RayService (llmserve-nb render-k8s), or deploy to a RayCluster instead"
            )

    def deploy(
        self,
        config: AppConfig | None = None,
        *,
        wait: bool = True,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = print,
    ) -> AppHandle:
        """Deploy (or update in place) one application; other applications on the cluster are kept.

        With `wait`, returns once Serve runs this config and its route answers; a deploy Serve reports
        as failed raises DeployError with Serve's own message.
        """
        config = config or AppConfig()
        self.deploy_application(config.to_application())
        handle = self.handles.get(config.name)
        if handle is None:
            handle = self.handles[config.name] = AppHandle(self, config)
        handle.config = config
        if wait:
            handle.wait_running(timeout_s=timeout_s, progress=progress)
        return handle

    def deploy_application(self, application: dict[str, Any]) -> None:
        """Send one raw `applications:` entry (what `AppConfig.to_application()` renders, or any Serve app,
        e.g. the rollout router) without waiting; the cluster's other applications and Serve's proxy
        options are kept. Refused when a RayService owns Serve here or the route prefix is taken."""
        name, prefix = application["name"], application.get("route_prefix")
        self._refuse_if_managed(f"deploy {name!r}")
        details = self.serve_details()
        others = [
            app["deployed_app_config"]
            for other, app in (details.get("applications") or {}).items()
            if other != name and app.get("deployed_app_config")
        ]
        for other in others:
            if prefix is not None and other.get("route_prefix") == prefix:
                raise DeployError(
                    f"route_prefix {prefix!r} is taken by application {other['name']!r}; "
                    "give this app another name and route_prefix"
                )
        body: dict[str, Any] = {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.serve_host, "port": urlparse(self.serve_url).port or 80},
            "applications": others + [application],
        }
        if details.get("http_options"):
            # Serve's proxy options are fixed once it runs; resend them unchanged.
            body["http_options"] = {k: details["http_options"][k] for k in ("host", "port") if k in details["http_options"]}
        self._api("PUT", "/api/serve/applications/", refused=DeployError, json=body)
        self.deployed.add(name)

    def delete(self, app_name: str, timeout_s: float = 120.0) -> None:
        """Remove one application; the others, and Serve itself, keep running."""
        self._refuse_if_managed(f"delete {app_name!r}")
        details = self.serve_details()
        apps = details.get("applications") or {}
        if app_name in apps:
            rest = [a["deployed_app_config"] for n, a in apps.items() if n != app_name and a.get("deployed_app_config")]
            # Even for the last app a PUT, never DELETE: DELETE shuts Serve down asynchronously and took
            # the next app deployed seconds later down with it.
            body: dict[str, Any] = {"applications": rest}
            if details.get("http_options"):
                body["http_options"] = {k: details["http_options"][k] for k in ("host", "port") if k in details["http_options"]}
            self._api("PUT", "/api/serve/applications/", json=body)
            deadline = time.monotonic() + timeout_s
            while app_name in (self.serve_details().get("applications") or {}):
                if time.monotonic() > deadline:
                    raise DeployError(f"application {app_name!r} still present {timeout_s:.0f}s after delete")
                time.sleep(0.5)
        self.deployed.discard(app_name)
        handle = self.handles.pop(app_name, None)
        if handle is not None:
            handle.close()

    def shutdown(self) -> None:
        """Delete the apps this object deployed (not those merely attached with `app()`, never those a
        RayService owns), close the connection, and stop the embedded Ray if this process started it."""
        if self.managed_by is None:
            for name in sorted(self.deployed):
                try:
                    self.delete(name)
                except ClusterError as e:
                    log.warning("could not delete %s: %s", name, e)
        for handle in self.handles.values():
            handle.close()
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
    """A deployed application: its URL, a few convenience calls, status and teardown.

    Each call to the app waits at most `request_timeout_s` (an attribute: raise it for long
    generations). A call the app does not answer (timeout, connection failure, 404/5xx from Serve's
    proxy) raises ClusterError with the app's status as Serve reports it, so a deploy that left no
    healthy replica shows up as such instead of as a hang.
    """

    def __init__(self, cluster: Cluster, config: AppConfig, api_key: str | None = None,
                 request_timeout_s: float = 120.0):
        self.cluster = cluster
        self.config = config
        self.name = config.name
        self.model = config.engine.model_name
        self.base_url = cluster.serve_url + config.route_prefix.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self._http = httpx.Client(base_url=self.base_url)
        self.api_key = api_key or os.environ.get("LLMSERVE_NB_API_KEY") or None

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @api_key.setter
    def api_key(self, key: str | None) -> None:
        """Set (or rotate) the key every call sends as `Authorization: Bearer <key>`."""
        self._api_key = key or None
        if self._api_key:
            self._http.headers["Authorization"] = f"Bearer {self._api_key}"
        else:
            self._http.headers.pop("Authorization", None)

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
        """Serve runs *our* config: the application entry we render (`args`, import path, route,
        runtime_env) and every key of each of our `deployments:` entries equal what Serve echoes back
        in `deployed_app_config`. Keys Serve has beyond ours are not compared."""
        want = self.config.to_application()
        got = st.get("deployed_app_config") or {}
        if not all(_same(v, got.get(k)) for k, v in want.items() if k != "deployments"):
            return False
        echoed = {d.get("name"): d for d in got.get("deployments") or []}
        return all(
            d["name"] in echoed and all(_same(v, echoed[d["name"]].get(k)) for k, v in d.items())
            for d in want.get("deployments") or []
        )

    def wait_running(self, timeout_s: float = 900.0, progress: Callable[[str], None] | None = print) -> None:
        """Wait until Serve runs this handle's config and the route answers; DeployError when Serve
        reports the deploy (or update) failed, with Serve's message, or after `timeout_s`."""
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
                raise DeployError(f"application {self.name!r} is {st['status']}: {self._serve_message(st)}")
            if time.monotonic() - t0 > timeout_s:
                raise DeployError(
                    f"application {self.name!r} not RUNNING with this config after {timeout_s:.0f}s "
                    f"(last status {line[:500]}); check cluster resources (num_cpus/num_gpus per replica) "
                    "and the Serve logs"
                )
            time.sleep(1.0)
        # The proxy learns routes asynchronously; don't hand back a URL that still 404s.
        while time.monotonic() - t0 <= timeout_s:
            try:
                if self._http.get("/health", timeout=CONNECT_TIMEOUT_S).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise DeployError(f"{self.base_url}/health did not answer within {timeout_s:.0f}s")

    @staticmethod
    def _serve_message(st: dict[str, Any]) -> str:
        """Serve's own words: the app's message, else its deployments' (a replica's traceback ends with the cause)."""
        messages = [st.get("message") or ""] + [d.get("message") or "" for d in st["deployments"].values()]
        text = "\n".join(m for m in messages if m) or "Serve gave no message"
        return text if len(text) <= 3000 else "…" + text[-3000:]

    @property
    def backend(self) -> str:
        return self.config.engine.backend

    def _transformers_only(self, what: str) -> None:
        if self.backend == "vllm":
            raise ClusterError(
                f"{what} is a feature of the transformers engine; app {self.name!r} runs vLLM through Ray Serve LLM, "
                "which batches continuously inside its engine (up to engine.max_num_seqs). Its batch is vLLM's "
                "num_requests_running metric: see AppHandle.burst() or llmserve_nb.monitor.LiveMonitor"
            )

    def reconfigure(self, **batching: Any) -> None:
        """Change batching live (Serve user_config → replica.reconfigure); replicas are not restarted."""
        self._transformers_only("live batching (max_batch_size, batch_wait_timeout_s)")
        self.update(self.config.with_overrides(**{f"batching.{k}": v for k, v in batching.items()}))

    def update(self, config: AppConfig, timeout_s: float = 900.0, progress: Callable[[str], None] | None = None) -> None:
        """Redeploy with another config of the same app (e.g. autoscaling bounds); Serve applies the diff.

        Returns once Serve reports it runs the new config; an update Serve rejects or cannot run
        (a model that does not load, no healthy replica) raises DeployError with Serve's message.
        """
        if config.name != self.name:
            raise ValueError(f"config is for app {config.name!r}, this handle is {self.name!r}")
        self.cluster.deploy(config, wait=False)
        self.config = config
        self.cluster.handles[self.name] = self
        self.wait_running(timeout_s=timeout_s, progress=progress)

    def shutdown(self) -> None:
        """Delete this app from the cluster (refused for an app a RayService owns)."""
        self.cluster.delete(self.name)
        self.close()

    def close(self) -> None:
        """Close the HTTP connections to the app; the app keeps running."""
        self._http.close()

    # ---- calls -----------------------------------------------------------------------------
    def _unanswered(self, call: str, cause: str) -> ClusterError:
        """The error for a call the app did not answer, with Serve's view of the app, which says why."""
        try:
            st = self.status()
        except ClusterError as e:
            return ClusterError(f"{call}: {cause}; Serve's status of {self.name!r} is unknown as well: {e}")
        running = sum(d["replica_states"].count("RUNNING") for d in st["deployments"].values())
        state = f"Serve reports application {self.name!r} {st['status']} with {running} running replica(s)"
        if st["status"] == "RUNNING" and running:
            hint = (f"the app looks healthy: a long generation may need more than request_timeout_s="
                    f"{self.request_timeout_s:g}, or the Serve proxy at {self.cluster.serve_url} "
                    "is not reachable from here")
        else:
            hint = self._serve_message(st)
        return ClusterError(f"{call}: {cause}. {state}: {hint}")

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.request_timeout_s, connect=min(CONNECT_TIMEOUT_S, self.request_timeout_s))

    def _refused(self, call: str, r: httpx.Response) -> ClusterError:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:500]
        cause = f"HTTP {r.status_code}: {msg}"
        # 404 and 5xx come from Serve's proxy when the app has no route or no replica to take the request.
        if r.status_code == 404 or r.status_code >= 500:
            return self._unanswered(call, cause)
        return ClusterError(f"{call} -> {cause}")

    def _transport_error(self, call: str, e: httpx.TransportError) -> ClusterError:
        if isinstance(e, httpx.TimeoutException):
            return self._unanswered(call, f"no answer within request_timeout_s={self.request_timeout_s:g}s")
        return self._unanswered(call, f"cannot reach the Serve proxy ({type(e).__name__}: {e})")

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        call = f"{method} {self.base_url}{path}"
        try:
            r = self._http.request(method, path, timeout=self._timeout(), **kw)
        except httpx.TransportError as e:
            raise self._transport_error(call, e) from None
        if r.status_code >= 400:
            raise self._refused(call, r)
        return r

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json=body).json()

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
        """Yield text deltas as the server streams them (SSE); each wait for the next chunk is bounded
        by `request_timeout_s`."""
        import json

        params.setdefault("temperature", 0.0)
        body = {"model": self.model, "messages": self._messages(content), "stream": True, **params}
        call = f"POST {self.base_url}/v1/chat/completions (stream)"
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body, timeout=self._timeout()) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._refused(call, r)
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise ClusterError(f"{call}: the stream failed: {data['error']['message']}")
                    for choice in data.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            yield choice["delta"]["content"]
        except httpx.TransportError as e:
            raise self._transport_error(call, e) from None

    def openai_client(self):
        """The official `openai` client pointed at this app, with the same timeout."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "not-needed", max_retries=0,
                             timeout=self.request_timeout_s)

    def stats(self) -> dict[str, Any]:
        """Batching statistics of the replica that answers (each replica keeps its own)."""
        self._transformers_only("/stats")
        return self._request("GET", "/stats").json()

    def burst(self, n: int = 16, max_tokens: int = 32, input_tokens: int = 16) -> dict[str, Any]:
        """Send `n` completions at once and report the batches the replica formed for them.

        The load is `llmserve_nb.bench`'s closed loop with `n` users and `n` requests. The histogram
        is the difference of the replica's counters before and after, so it is exact for a single
        replica and quiet traffic (each replica keeps its own counters). For a vLLM app the batch is
        vLLM's running-request gauge sampled from Ray's metrics endpoints (`vllm_app.vllm_burst`).
        """
        from llmserve_nb.bench import Workload, run_benchmark

        if self.backend == "vllm":
            from llmserve_nb.vllm_app import vllm_burst

            return vllm_burst(self, n=n, max_tokens=max_tokens, input_tokens=input_tokens)

        workload = Workload(num_requests=n, input_tokens=input_tokens, output_tokens=max_tokens, stream=False,
                            duration_s=self.request_timeout_s, timeout_s=self.request_timeout_s)
        before = self.stats()
        run = run_benchmark(self.base_url, workload, concurrency=n, model=self.model, label=f"burst {self.name}",
                            progress=False, api_key=self.api_key)
        after = self.stats()
        summary = run.summary()
        if summary["completed"] < n:
            raise self._unanswered(
                f"burst of {n} requests to {self.base_url}",
                f"{summary['errors']} failed, {summary['incomplete']} unfinished "
                f"({summary['error_example'] or 'no error'})",
            )
        latencies = sorted(r.e2e_s for r in run.results)
        hist = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
        hist = {k: v for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])) if v}
        return {
            "requests": n,
            "wall_s": round(run.duration_s, 3),
            "output_tok_per_s": round(summary["output_tok_per_s"], 1),
            "latency_p50_s": round(summary["e2e_ms_p50"] / 1000, 3),
            "latency_max_s": round(latencies[-1], 3),
            "batch_size_histogram": hist,
            "max_batch_size_seen": max((int(k) for k in hist), default=0),
        }

    def _repr_html_(self) -> str:
        try:
            st = self.status()
        except ClusterError as e:
            st = {"status": f"unknown ({e})", "deployments": {}}
        if self.backend == "vllm":
            from llmserve_nb.vllm_app import llm_server_deployment_name

            dep = st["deployments"].get(llm_server_deployment_name(self.model), {})
        else:
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
        # An ephemeral port unless one is asked for: a busy 8265 surfaces only after Ray's whole dashboard
        # start-up timeout.
        dport = dashboard_port or _free_port(0)
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
    port_forward: str, timeout_s: float, api_client: Any,
) -> tuple[Cluster, tuple[str | None, str | None]]:
    """The Cluster behind a KubeRay RayCluster/RayService, and the (ray, python) versions its spec declares."""
    from llmserve_nb.kuberay import KubeRayCluster

    kr = KubeRayCluster(name, namespace, kind=kind, api_client=api_client, context=context)  # type: ignore[arg-type]
    kr.wait_ready(timeout_s=timeout_s, progress=print)
    raycluster = kr.raycluster()
    if token is None:
        token = kr.auth_token(token_secret, raycluster)
    conn = kr.connect(port_forward=port_forward)  # type: ignore[arg-type]
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
    port_forward: Literal["auto", "kubectl", "client"] = "auto",
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
      DNS inside a pod, or through a port-forward outside.

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
        cluster, declared = _kuberay_cluster(kuberay, namespace, kind, context, token, token_secret, port_forward,
                                             timeout_s, api_client)
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
