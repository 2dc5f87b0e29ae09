"""The client of a Ray cluster's dashboard: reads its nodes and Serve applications, deploys and deletes apps.

One `Cluster` serves every target `connect()` can reach (embedded, address, KubeRay), so what happens
after connecting is a single code path that the local default exercises and tests can aim at a fake
dashboard; the version-skew check is here because the dashboard is where the cluster's Ray version is
read. Shipping this package to a cluster without it (`shipping`) happens here too: the upload goes
through the same dashboard, and every application entry this client sends passes through it.
"""
from __future__ import annotations

import html
import logging
import platform
import re
import time
from importlib import metadata
from typing import Any, Callable
from urllib.parse import urlparse

import httpx

from llmserve_nb.backends import application, config_of_application
from llmserve_nb.cluster.app import AppHandle
from llmserve_nb.cluster.errors import CONNECT_TIMEOUT_S, ClusterError, DeployError
from llmserve_nb.cluster.shipping import (
    PackageZip,
    PipSpec,
    Shipping,
    imports_this_package,
    missing_module_hint,
    package_zip,
)
from llmserve_nb.cluster.status import AppStatus, parse_serve_details, routing_of
from llmserve_nb.config import AppConfig, ConfigError

log = logging.getLogger(__name__)


def _local_ray_version() -> tuple[str | None, str]:
    """The Ray version this side must match, and how a message names it ("...{}..." for the version): read
    from the installed distribution, not by importing ray (seconds). A core install has no Ray and talks REST;
    the cluster must then run the Ray the replica side is pinned to (`ray[serve]==X` in the metadata). A
    source tree neither installed nor with Ray gives (None, ...): the Ray check is skipped."""
    try:
        return metadata.version("ray"), "this kernel has ray {}"
    except metadata.PackageNotFoundError:
        pass
    try:
        requires = metadata.requires("llmserve-nb") or []
    except metadata.PackageNotFoundError:
        requires = []
    for requirement in requires:
        if pinned := re.match(r"ray(\[[^\]]*\])?\s*==\s*([^\s;,]+)", requirement):
            return pinned.group(2), "this client (without ray) is built for ray {}"
    log.info("no ray here, and no llmserve-nb metadata to read its pin from: the Ray version is not checked")
    return None, ""


def check_version_skew(
    cluster_ray: str | None, cluster_python: str | None, local_ray: str | None = None, local_python: str | None = None
) -> None:
    """Raise ClusterError when the cluster's Ray (exact) or Python (major.minor) differs from this kernel's:
    the Serve config, pickles and Ray's protocol break across Ray versions, pickled code across Python
    minors, so `connect()` checks this first. A version the cluster does not state (None) is not checked."""
    here = "this kernel has ray {}"
    if local_ray is None:
        local_ray, here = _local_ray_version()
    local_python = local_python or platform.python_version()
    problems = []
    if cluster_ray and local_ray and cluster_ray != local_ray:
        problems.append(f"the cluster runs ray {cluster_ray}, {here.format(local_ray)}")
    if cluster_python and cluster_python.split(".")[:2] != local_python.split(".")[:2]:
        problems.append(f"the cluster runs Python {cluster_python}, this kernel has Python {local_python}")
    if problems:
        raise ClusterError(
            "Ray version skew: " + "; ".join(problems)
            + f". Install the cluster's versions here (`pip install ray[serve]=={cluster_ray or local_ray}`"
            + (f" on Python {cluster_python}" if cluster_python else "")
            + ") or use a cluster image that matches this kernel (connect(check_version=False) skips this check)"
        )


class Cluster:
    """A Ray cluster reached through its dashboard (REST) and its Serve HTTP proxy.

    `transport` replaces how HTTP requests leave, for the dashboard and for the handles this object
    creates (tests pass an `httpx.MockTransport`).

    `ship_package` is the default of `deploy(ship_package=...)`: True unless the cluster is the embedded
    local Ray, which runs in this kernel's own environment and so already imports this package.
    """

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
        transport: httpx.BaseTransport | None = None,
    ):
        self.dashboard_url = dashboard_url.rstrip("/")
        self.serve_url = serve_url.rstrip("/")
        self.kind = kind
        self.how = how
        self.serve_host = serve_host
        self._on_close = on_close
        self._transport = transport
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.dashboard_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )
        self.deployed: set[str] = set()  # apps deployed through this object: the only ones shutdown() deletes
        self._attached: set[str] = set()  # apps found running by app(): updating them does not make them ours
        self.managed_by: str | None = None  # name of the RayService whose operator owns Serve here
        self.ship_package = kind != "local"
        # What deploy() decided per app, so that later updates of the same app (AppHandle.update, reconfigure)
        # send the same runtime_env: a different one would restart every replica.
        self._shipping: dict[str, Shipping] = {}
        # The package each app was last sent: what its handle waits for, though the source may change meanwhile.
        self._sent_packages: dict[str, PackageZip] = {}

    # ---- REST ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        """The dashboard's answer; a ClusterError naming what to check when there is none or it refuses our token."""
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
        return r

    def _api(self, method: str, path: str, refused: type[ClusterError] = ClusterError, **kw) -> Any:
        url = f"{self.dashboard_url}{path}"
        r = self._request(method, path, **kw)
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
        """Serve's raw answer (`GET /api/serve/applications/`); `app_statuses()` is the same, parsed."""
        return self._api("GET", "/api/serve/applications/")

    def app_statuses(self) -> dict[str, AppStatus]:
        """Every Serve application's status, by name."""
        return parse_serve_details(self.serve_details())

    def app_status(self, name: str) -> AppStatus | None:
        """The status of one Serve application; None when Serve does not know it."""
        return self.app_statuses().get(name)

    def applications(self) -> list[dict[str, Any]]:
        """One row per deployment of each Serve application: status, replicas by state and node."""
        return [
            {
                "app": app.name,
                "route_prefix": app.route_prefix,
                "app_status": app.status,
                "deployment": dep.name,
                "deployment_status": dep.status,
                "target_replicas": dep.target_replicas,
                "running_replicas": len(dep.running),
                "nodes": sorted({r.node_id[:12] for r in dep.replicas}),
                "message": app.message or dep.message,
            }
            for app in self.app_statuses().values()
            for dep in app.deployments.values()
        ]

    # ---- deploy ----------------------------------------------------------------------------
    def _handle(self, config: AppConfig) -> AppHandle:
        return AppHandle(self, config, transport=self._transport)

    def app(self, name: str = "llm") -> AppHandle:
        """A handle to an application that already runs, e.g. one a RayService deployed.

        Attaching does not make the app ours: `shutdown()` leaves it running.
        """
        apps = self.app_statuses()
        if name not in apps:
            raise ClusterError(f"no Serve application {name!r} on this cluster (running: {sorted(apps) or 'none'})")
        running = apps[name].deployed_config or {"name": name}
        try:
            config = config_of_application(running)
        except ConfigError as e:
            raise ClusterError(f"application {name!r} is not an llmserve_nb app: {e}") from None
        self._shipping.setdefault(name, Shipping.of_running(running.get("runtime_env")))
        if name not in self.deployed:
            self._attached.add(name)
        return self._handle(config)

    def _refuse_if_managed(self, what: str) -> None:
        if self.managed_by is not None:
            raise DeployError(
                f"cannot {what}: this cluster belongs to RayService {self.managed_by!r}: KubeRay reconciles its "
                "serveConfigV2 and would revert a deploy made here. Use cluster.app(name) to work with the app it "
                "runs, change the RayService (llmserve-nb k8s render), or deploy to a RayCluster instead"
            )

    def deploy(
        self,
        config: AppConfig | None = None,
        *,
        ship_package: bool | None = None,
        pip: PipSpec = None,
        wait: bool = True,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = print,
    ) -> AppHandle:
        """Deploy (or update in place) one application; other applications on the cluster are kept.

        The cluster needs this package and its Python dependencies on every node that runs a replica:
        - `ship_package`: upload this kernel's `llmserve_nb` to the cluster (through the dashboard, as
          `ray job submit` uploads code) and add it to the app's runtime_env `py_modules`. None means
          `cluster.ship_package`: True except on the embedded local Ray (same Python as this kernel).
          Then a stock Ray image (`rayproject/ray`) runs the app, and the replicas always run the code
          this kernel has. False relies on the cluster's image having the package.
        - `pip`: install the dependencies in the app's runtime_env: "serve" (the core requirements and
          the `[serve]` extra of this llmserve-nb, without Ray, torch at its pin), a list of
          requirements, or Ray's pip dict (`{"packages": [...], "pip_install_options": [...]}`). Every
          node then builds a virtualenv on the first replica it starts, which with torch takes minutes.
          None (the default) adds nothing: the cluster's image must have the dependencies (build it with
          `pip install 'llmserve-nb[serve]'`, as k8s/image/Dockerfile does). Ray's runtime_env
          `image_uri` (podman on every node, experimental in Ray 2.60) is the alternative for a per-app image.
        The choice is remembered for this app's name: `AppHandle.update()` and `reconfigure()` send the
        same runtime_env, since another one would restart every replica. The package's URI is its
        content hash, so redeploying unchanged code changes nothing either.

        With `wait`, returns once Serve runs this config and its route answers; a deploy Serve reports
        as failed raises DeployError with Serve's own message, led by the fix when a module is missing.
        """
        config = config or AppConfig()
        self._attached.discard(config.name)
        self._shipping[config.name] = Shipping.of(self.ship_package if ship_package is None else ship_package, pip)
        self.deploy_application(application(config))
        handle = self._handle(config)
        if wait:
            try:
                handle.wait_running(timeout_s=timeout_s, progress=progress)
            except DeployError as e:
                hint = missing_module_hint(str(e))
                if hint is None:
                    raise
                raise DeployError(f"application {config.name!r} cannot start: {hint}.\n\n{e}") from None
        return handle

    def application(self, config: AppConfig) -> dict[str, Any]:
        """The `applications:` entry this cluster deploys for `config`: the backend's rendering
        (`llmserve_nb.backends.application`), with the package and pip list this app gets (see `deploy`)."""
        return self._shipped(application(config), fresh=False)[0]

    def _shipped(self, entry: dict[str, Any], fresh: bool) -> tuple[dict[str, Any], PackageZip | None]:
        """`entry` with its runtime_env as this app's shipping wants it, and the package it names, if any:
        the package as the source is now (`fresh`), else as it was last sent for this app."""
        if not imports_this_package(entry):
            return entry, None
        name = entry["name"]
        shipping = self._shipping.get(name) or Shipping(package=self.ship_package)
        package = ((None if fresh else self._sent_packages.get(name)) or package_zip()) if shipping.package else None
        return shipping.apply(entry, package), package

    def upload_package(self, package: PackageZip | None = None) -> str:
        """Upload the package (default: this `llmserve_nb`) to the cluster's GCS unless it is there already, as
        Ray's job submission client does; its URI for a runtime_env's `py_modules`.

        The GET that finds it also pins it for 10 minutes (Ray's `pin_runtime_env_uri`), time enough for
        the replicas that use it to start, which keep it from then on.
        """
        package = package or package_zip()
        path = f"/api/packages/gcs/{package.name}"
        found = self._request("GET", path)
        if found.status_code == 404:
            log.info("uploading %s (%d KiB) to %s", package.uri, len(package.data) // 1024, self.dashboard_url)
            self._api("PUT", path, refused=DeployError, content=package.data,
                      headers={"content-type": "application/octet-stream"})
        elif found.status_code != 200:
            raise DeployError(f"GET {self.dashboard_url}{path} failed with HTTP {found.status_code}: "
                              f"{found.text[:2000]}")
        return package.uri

    def _put_applications(self, details: dict[str, Any], applications: list[dict[str, Any]],
                          refused: type[ClusterError] = ClusterError) -> None:
        body: dict[str, Any] = {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.serve_host, "port": urlparse(self.serve_url).port or 80},
            "applications": applications,
        }
        if details.get("http_options"):
            # Serve's proxy options are fixed once it runs; resend them unchanged.
            body["http_options"] = {k: details["http_options"][k] for k in ("host", "port") if k in details["http_options"]}
        self._api("PUT", "/api/serve/applications/", refused=refused, json=body)

    def deploy_application(self, application: dict[str, Any]) -> None:
        """Send one raw `applications:` entry (what `llmserve_nb.backends.application(config)` renders, or any
        Serve app, e.g. the rollout router) without waiting; the cluster's other applications and Serve's proxy
        options are kept. Refused when a RayService owns Serve here or the route prefix is taken.

        An entry that runs this package's code gets the package and pip list its app's shipping says (see
        `deploy`; apps deployed otherwise, e.g. the rollout router, get `ship_package`), uploaded first."""
        name, prefix = application["name"], application.get("route_prefix")
        self._refuse_if_managed(f"deploy {name!r}")
        application, package = self._shipped(application, fresh=True)
        details = self.serve_details()
        running = parse_serve_details(details)
        if name in running and routing_of(running[name].deployed_config) != routing_of(application):
            # Serve 2.60 keeps a deployment's router through in-place updates (the old one went on routing, and
            # an ingress added in place left requests hanging), so an app whose routing changes starts afresh.
            log.warning("application %r changes its request routing: deleting it before deploying it again", name)
            self.delete(name)
            details = self.serve_details()
            running = parse_serve_details(details)
        others = [app.deployed_config for app in running.values() if app.name != name and app.deployed_config]
        for other in others:
            if prefix is not None and other.get("route_prefix") == prefix:
                raise DeployError(
                    f"route_prefix {prefix!r} is taken by application {other['name']!r}; "
                    "give this app another name and route_prefix"
                )
        if package is not None:
            self.upload_package(package)
        self._put_applications(details, others + [application], refused=DeployError)
        if package is not None:
            self._sent_packages[name] = package
        if name not in self._attached:
            self.deployed.add(name)

    def delete(self, app_name: str, timeout_s: float = 120.0) -> None:
        """Remove one application; the others, and Serve itself, keep running."""
        self._refuse_if_managed(f"delete {app_name!r}")
        details = self.serve_details()
        apps = parse_serve_details(details)
        if app_name in apps:
            # Even for the last app a PUT, never DELETE: DELETE shuts Serve down asynchronously and took
            # the next app deployed seconds later down with it.
            self._put_applications(details, [a.deployed_config for a in apps.values()
                                             if a.name != app_name and a.deployed_config])
            deadline = time.monotonic() + timeout_s
            while self.app_status(app_name) is not None:
                if time.monotonic() > deadline:
                    raise DeployError(f"application {app_name!r} still present {timeout_s:.0f}s after delete")
                time.sleep(0.5)
        self.deployed.discard(app_name)

    def close(self) -> None:
        """Close the connection, and stop the port-forward or embedded Ray this object started; every
        application keeps running (for as long as its cluster does)."""
        self._http.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def shutdown(self) -> None:
        """Delete the apps this object deployed (not those merely attached with `app()`, never those a
        RayService owns), then `close()`."""
        if self.managed_by is None:
            for name in sorted(self.deployed):
                try:
                    self.delete(name)
                except ClusterError as e:
                    log.warning("could not delete %s: %s", name, e)
        self.close()

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
