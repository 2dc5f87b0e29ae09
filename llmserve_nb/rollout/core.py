"""`Rollout`: a second version next to the first, traffic shifted step by step, compared, then promoted
or rolled back, without dropping a request.

Layout on the cluster (all Serve applications of one Serve config, deployed through the REST API):

    public route (route_prefix, e.g. "/")  ->  router application (RolloutRouter, num_cpus 0)
    stable version  -> its own application and route prefix (e.g. "llm-a" at "/llm-a")
    canary version  -> its own application and route prefix (e.g. "llm-b" at "/llm-b")

Clients use the public route; the router forwards each request to one version by weight, sticky by
the session header, and names the version in `x-served-by`. Weights live in the router's
`user_config`, so a shift is an in-place `reconfigure` (no replica restarts, no cut streams). Each
version's own route stays reachable, which is what `compare()` benchmarks.

Zero-drop promote/rollback: the leaving version first gets weight 0 (applied on the router before the
call returns), then the router's in-flight count for it must reach 0, and only then is its application
deleted (Serve's graceful shutdown covers anything still running). A request that could not reach a
version at all (connection refused, no route) is re-sent by the router to another version.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import httpx

from llmserve_nb.cluster import CONNECT_TIMEOUT_S, AppHandle, Cluster, ClusterError
from llmserve_nb.cluster.status import NOT_DEPLOYED, AppStatus, parse_serve_details
from llmserve_nb.config import AppConfig
from llmserve_nb.rollout.routing import (
    ROUTER_DEPLOYMENT,
    ROUTER_IMPORT_PATH,
    STATUS_PATH,
    RouterConfig,
    Version,
)

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A rollout step failed; the message says what state the traffic was left in."""


class Rollout:
    """A stable version and (optionally) a canary behind one public route, with a weighted sticky split.

    Example::

        stable = AppConfig(name="llm-a", route_prefix="/llm-a")
        canary = stable.with_overrides(name="llm-b", route_prefix="/llm-b", **{"batching.max_batch_size": 4})
        ro = Rollout(cluster, stable=stable, canary=canary, route_prefix="/")
        ro.deploy()            # stable 100 %, canary 0 % (but reachable on its own route)
        ro.compare(Workload(num_requests=8, output_tokens=16))
        ro.steps([10, 50, 100], hold_s=30)
        ro.promote()           # or ro.rollback()

    Every call to the cluster has a timeout; failures raise `RolloutError` (or the cluster's
    `DeployError` / `ClusterError`) saying where the traffic is.
    """

    def __init__(
        self,
        cluster: Cluster,
        stable: AppConfig,
        canary: AppConfig | None = None,
        *,
        name: str = "llm-router",
        route_prefix: str = "/",
        sticky_header: str = "X-Session-Id",
        router_replicas: int = 1,
        request_timeout_s: float = 600.0,
        deploy_timeout_s: float = 900.0,
        apply_timeout_s: float = 120.0,
        progress: Callable[[str], None] | None = print,
        on_change: Callable[[str], None] | None = None,
    ):
        self.cluster = cluster
        self.name = name
        self.route_prefix = route_prefix
        self.sticky_header = sticky_header
        self.router_replicas = router_replicas
        self.request_timeout_s = request_timeout_s
        self.deploy_timeout_s = deploy_timeout_s
        self.apply_timeout_s = apply_timeout_s
        self.progress = progress
        self.on_change = on_change  # called with a label once each change is live (e.g. TrafficLoad.mark)
        self.stable = stable
        self.canary: AppConfig | None = None
        self.handles: dict[str, AppHandle] = {}
        self.history: list[dict[str, Any]] = []
        self._config: RouterConfig | None = None
        self._http = httpx.Client(base_url=self.base_url, trust_env=False,
                                  timeout=httpx.Timeout(10.0, connect=CONNECT_TIMEOUT_S))
        self._check_layout(stable, canary)
        self.canary = canary

    # ---- layout ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The public route: what clients use, whatever the versions behind it."""
        return self.cluster.serve_url + self.route_prefix.rstrip("/")

    def _check_layout(self, stable: AppConfig, canary: AppConfig | None) -> None:
        apps = [stable] + ([canary] if canary is not None else [])
        names = [a.name for a in apps] + [self.name]
        if len(set(names)) != len(names):
            raise RolloutError(f"the router and the versions need distinct application names, got {names}")
        prefixes = [a.route_prefix.rstrip("/") or "/" for a in apps] + [self.route_prefix.rstrip("/") or "/"]
        if len(set(prefixes)) != len(prefixes):
            raise RolloutError(
                f"the public route {self.route_prefix!r} and each version need their own route prefix, got "
                f"{dict(zip(names, prefixes))}: give every version e.g. route_prefix='/<its name>'"
            )
        if self.router_replicas < 1:
            raise RolloutError("router_replicas must be >= 1")

    def _say(self, msg: str) -> None:
        log.info(msg)
        if self.progress:
            self.progress(msg)

    def _app_entry(self, config: RouterConfig) -> dict[str, Any]:
        return {
            "name": self.name,
            "route_prefix": self.route_prefix,
            "import_path": ROUTER_IMPORT_PATH,
            "args": {},
            "deployments": [{
                "name": ROUTER_DEPLOYMENT,
                "num_replicas": self.router_replicas,
                "user_config": config.model_dump(mode="json"),
                "ray_actor_options": {"num_cpus": 0},
                "max_ongoing_requests": 1000,
                "max_queued_requests": -1,
                # A stopping router replica finishes the streams it relays.
                "graceful_shutdown_timeout_s": self.request_timeout_s,
            }],
        }

    def _deployed_router_config(self, apps: dict[str, AppStatus] | None = None) -> RouterConfig | None:
        """The weights Serve was last given for the router (its deployed config), None without a router."""
        apps = apps if apps is not None else self.cluster.app_statuses()
        app = apps.get(self.name)
        if app is None:
            return None
        for dep in app.deployed_config.get("deployments") or []:
            if dep.get("name") == ROUTER_DEPLOYMENT and dep.get("user_config"):
                return RouterConfig.model_validate(dep["user_config"])
        return None

    def _upstream(self, details: dict[str, Any]) -> str:
        # The router forwards through the Serve proxy of its own node: with proxy_location EveryNode
        # every node runs one, on the same port.
        port = (details.get("http_options") or {}).get("port") or httpx.URL(self.cluster.serve_url).port or 8000
        return f"http://127.0.0.1:{port}"

    # ---- router ----------------------------------------------------------------------------
    def _apply(self, versions: list[Version], action: str) -> RouterConfig:
        """Send the router its new user_config and return once the router answers with it."""
        details = self.cluster.serve_details()
        apps = parse_serve_details(details)
        current = self._deployed_router_config(apps)
        epoch = max(current.epoch if current else 0, self._config.epoch if self._config else 0) + 1
        config = RouterConfig(epoch=epoch, versions=versions, upstream=self._upstream(details),
                              sticky_header=self.sticky_header.lower(), request_timeout_s=self.request_timeout_s)
        for other, app in apps.items():
            if other != self.name and app.route_prefix == self.route_prefix:
                raise RolloutError(f"the public route {self.route_prefix!r} is taken by application {other!r}; "
                                   "pick another route_prefix for the rollout")
        self.cluster.deploy_application(self._app_entry(config))  # cluster.shutdown() removes the router too
        self._wait_applied(config)
        self._config = config
        self.history.append({"t": time.time(), "epoch": epoch, "action": action, "weights": config.weights()})
        self._say(f"router {self.name}: epoch {epoch}, weights {config.weights()} ({action})")
        if self.on_change:
            self.on_change(action)
        return config

    def _wait_applied(self, config: RouterConfig) -> None:
        deadline = time.monotonic() + self.apply_timeout_s
        last = ""
        while True:
            app = self.cluster.app_status(self.name) or AppStatus(self.name, status=NOT_DEPLOYED)
            dep = app.deployment(ROUTER_DEPLOYMENT)
            live = dep.user_config or {}
            last = f"{app.status}/{dep.status} epoch {live.get('epoch')}: {app.message[:500]}"
            if app.status == "DEPLOY_FAILED":
                raise RolloutError(f"the rollout router {self.name!r} failed to deploy: {last}")
            if app.status == "RUNNING" and dep.status == "HEALTHY" and live.get("epoch") == config.epoch:
                seen = self._router_epochs(tries=3 * self.router_replicas)
                if seen and min(seen) >= config.epoch:
                    return
                last = f"router replicas answered epochs {sorted(set(seen))}"
            if time.monotonic() > deadline:
                raise RolloutError(f"the router did not apply epoch {config.epoch} within {self.apply_timeout_s:.0f}s "
                                   f"(last: {last}); traffic follows whichever weights the router still has")
            time.sleep(0.25)

    def _router_epochs(self, tries: int) -> list[int]:
        epochs = []
        for _ in range(tries):
            try:
                r = self._http.get(STATUS_PATH)
                if r.status_code == 200:
                    epochs.append(int(r.json()["epoch"]))
            except (httpx.HTTPError, ValueError, KeyError):
                pass
        return epochs

    def router_status(self) -> dict[str, Any]:
        """The router's own view (one replica's): epoch, weights, per version requests, in flight,
        status codes, time to first byte."""
        try:
            r = self._http.get(STATUS_PATH)
        except httpx.HTTPError as e:
            raise ClusterError(f"GET {self.base_url}{STATUS_PATH}: the router did not answer ({type(e).__name__}: {e})")
        if r.status_code != 200:
            raise ClusterError(f"GET {self.base_url}{STATUS_PATH} -> HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _versions(self, weights: dict[str, float]) -> list[Version]:
        configs = {self.stable.name: self.stable}
        if self.canary is not None:
            configs[self.canary.name] = self.canary
        return [Version(name=n, route_prefix=configs[n].route_prefix, weight=w) for n, w in weights.items()]

    # ---- lifecycle -------------------------------------------------------------------------
    def deploy(self, canary: AppConfig | None = None) -> Rollout:
        """Deploy (or adopt) the stable version and the router, then the canary at weight 0.

        Idempotent: what already runs with the same config is left as it is. A canary that fails to
        deploy is removed again and raises RolloutError with Serve's message; the stable version keeps
        100 % of the traffic.
        """
        if canary is not None:
            if self.canary is not None and canary.name != self.canary.name:
                raise RolloutError(f"canary {self.canary.name!r} is still in progress: promote() or rollback() first")
            self._check_layout(self.stable, canary)
            self.canary = canary
        self._say(f"deploying stable {self.stable.name} at {self.stable.route_prefix}")
        self.handles[self.stable.name] = self.cluster.deploy(self.stable, timeout_s=self.deploy_timeout_s,
                                                             progress=self.progress)
        current = self._deployed_router_config()
        known = {self.stable.name} | ({self.canary.name} if self.canary is not None else set())
        if current is not None and current.weights().get(self.stable.name) is not None \
                and set(current.weights()) <= known:
            self._config = current  # a router already splitting between these versions (a re-run): keep it
        else:
            self._apply(self._versions({self.stable.name: 100.0}), "stable 100%")
        if self.canary is None:
            return self
        self._say(f"deploying canary {self.canary.name} at {self.canary.route_prefix}")
        try:
            self.handles[self.canary.name] = self.cluster.deploy(self.canary, timeout_s=self.deploy_timeout_s,
                                                                 progress=self.progress)
        except ClusterError as e:
            failed = self.canary
            self.canary = None
            try:
                self.cluster.delete(failed.name)
            except ClusterError as e2:
                log.warning("could not remove the failed canary %s: %s", failed.name, e2)
            raise RolloutError(
                f"canary {failed.name!r} failed to deploy and was removed; stable {self.stable.name!r} still "
                f"serves 100 % of {self.base_url}. Serve said: {e}"
            ) from None
        weights = self._config.weights() if self._config else {self.stable.name: 100.0}
        if self.canary.name not in weights:
            self._apply(self._versions({**weights, self.canary.name: 0.0}), "canary 0%")
        return self

    def _need_canary(self, what: str) -> AppConfig:
        if self.canary is None:
            raise RolloutError(f"{what}: no canary in progress (deploy(canary=AppConfig(...)) first)")
        return self.canary

    def shift(self, weight: float) -> dict[str, float]:
        """Send `weight` percent of the traffic (of the sessions) to the canary, the rest to the stable.
        Applied in place on the router; returns once the router uses it."""
        canary = self._need_canary("shift")
        if not 0 <= weight <= 100:
            raise RolloutError(f"weight must be a percentage in [0, 100], got {weight}")
        self._apply(self._versions({self.stable.name: 100.0 - weight, canary.name: float(weight)}), f"{weight:g}%")
        return self._config.weights()  # type: ignore[union-attr]

    def steps(self, weights: Sequence[float], hold_s: float = 30.0, max_error_rate: float | None = None,
              ) -> list[dict[str, Any]]:
        """Shift through `weights` (canary percent), holding each for `hold_s`. With `max_error_rate`,
        a step where the canary answered more than that fraction of 5xx or broken streams (as the
        router counted them) rolls back and raises RolloutError."""
        canary = self._need_canary("steps")
        rows = []
        for w in weights:
            before = self.router_status()["versions"].get(canary.name, {})
            self.shift(w)
            time.sleep(hold_s)
            after = self.router_status()["versions"].get(canary.name, {})
            n = after.get("requests", 0) - before.get("requests", 0)
            bad = (after.get("errors_5xx", 0) - before.get("errors_5xx", 0)
                   + after.get("broken_streams", 0) - before.get("broken_streams", 0))
            row = {"canary_weight": w, "canary_requests": n, "canary_errors": bad,
                   "canary_ttfb_ms_p50": after.get("ttfb_ms_p50")}
            rows.append(row)
            if max_error_rate is not None and n and bad / n > max_error_rate:
                self.rollback()
                raise RolloutError(f"canary {canary.name!r} failed {bad} of {n} requests at {w:g}% "
                                   f"(> {max_error_rate:.1%}); rolled back to {self.stable.name!r}")
        return rows

    def compare(self, workload: Any = None, *, concurrency: int = 4, progress: bool = False) -> Any:
        """Benchmark each version on its own route with the same `bench.Workload`; returns a
        `bench.BenchReport` (one run per version, labelled by application name)."""
        from llmserve_nb.bench import BenchReport, Workload, run_benchmark

        canary = self._need_canary("compare")
        wl = workload or Workload(num_requests=8, output_tokens=16)
        runs = []
        for config in (self.stable, canary):
            handle = self.handles.get(config.name) or self.cluster.app(config.name)
            runs.append(run_benchmark(handle.base_url, wl, concurrency=concurrency, label=config.name,
                                      progress=progress, api_key=handle.api_key))
        return BenchReport(runs)

    def _drain(self, name: str, timeout_s: float) -> None:
        """Wait until the router has no request in flight to `name` (it already has weight 0)."""
        deadline = time.monotonic() + timeout_s
        zeros = 0
        while zeros < 2 * self.router_replicas:
            try:
                in_flight = self.router_status()["versions"].get(name, {}).get("in_flight", 0)
            except ClusterError:
                in_flight = None
            zeros = zeros + 1 if in_flight == 0 else 0
            if time.monotonic() > deadline:
                raise RolloutError(f"{name!r} still had {in_flight} request(s) in flight after {timeout_s:.0f}s; it "
                                   "gets no new traffic (weight 0) and was left running: call again to finish")
            time.sleep(0.25)

    def _retire(self, leaving: AppConfig, staying: AppConfig, drain_timeout_s: float, action: str) -> None:
        self._apply(self._versions({staying.name: 100.0, leaving.name: 0.0}), f"{action}: {staying.name} 100%")
        self._drain(leaving.name, drain_timeout_s)
        self.stable, self.canary = staying, None
        self._apply(self._versions({staying.name: 100.0}), action)
        self._say(f"removing {leaving.name} (drained)")
        self.cluster.delete(leaving.name)
        handle = self.handles.pop(leaving.name, None)
        if handle is not None:
            handle.close()

    def promote(self, drain_timeout_s: float = 300.0) -> dict[str, Any]:
        """The canary takes 100 % and becomes the stable version; the old stable is removed once the
        router has no request in flight to it."""
        canary = self._need_canary("promote")
        old = self.stable
        self._retire(old, canary, drain_timeout_s, "promoted")
        return self.status()

    def rollback(self, drain_timeout_s: float = 300.0) -> dict[str, Any]:
        """The stable takes 100 % again; the canary is removed once drained."""
        canary = self._need_canary("rollback")
        self._retire(canary, self.stable, drain_timeout_s, "rolled back")
        return self.status()

    def status(self) -> dict[str, Any]:
        """Public URL, weights and per version: role, route, Serve status, running replicas, router counts."""
        apps = self.cluster.app_statuses()
        config = self._deployed_router_config(apps)
        try:
            routed = self.router_status()["versions"]
        except ClusterError:
            routed = {}
        versions = {}
        for role, app in (("stable", self.stable), ("canary", self.canary)):
            if app is None:
                continue
            a = apps.get(app.name) or AppStatus(app.name, status=NOT_DEPLOYED)
            versions[app.name] = {
                "role": role, "route_prefix": app.route_prefix,
                "weight": (config.weights() if config else {}).get(app.name, 0.0),
                "app_status": a.status,
                "running_replicas": a.running_replicas,
                **{k: routed.get(app.name, {}).get(k) for k in ("requests", "in_flight", "errors_5xx", "ttfb_ms_p50")},
            }
        return {"public_url": self.base_url, "router": self.name, "epoch": config.epoch if config else None,
                "weights": config.weights() if config else {}, "versions": versions}

    def shutdown(self) -> None:
        """Remove the router and both versions."""
        for name in [self.name] + [a.name for a in (self.canary, self.stable) if a is not None]:
            try:
                self.cluster.delete(name)
            except ClusterError as e:
                log.warning("could not delete %s: %s", name, e)
        for h in self.handles.values():
            h.close()
        self.handles.clear()
        self._http.close()

    def __repr__(self) -> str:
        return (f"Rollout(public={self.base_url!r}, stable={self.stable.name!r}, "
                f"canary={self.canary.name if self.canary else None!r})")
