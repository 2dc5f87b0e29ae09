"""The rollout router: a small Serve application at the public route prefix that forwards each request
to one version (a Serve application of its own) by weight, sticky by session header.

Why a router: Ray Serve 2.60 maps one route prefix to exactly one application and has no weighted
split between applications or deployments. Model multiplexing routes by model id to replicas of one
deployment (no weights, and both versions would have to be one deployment with one code version), and
`target_capacity` scales a whole Serve config (it is what KubeRay's incremental upgrade drives between
two clusters), not two versions inside one cluster. So the split lives here.

Why HTTP and not a DeploymentHandle: the versions are FastAPI ingress deployments whose routes take a
Starlette `Request`, which cannot cross a handle; forwarding the HTTP request through the local Serve
proxy keeps the whole OpenAI surface (every route, status codes, headers, SSE streams, client
disconnects that abort generation) with no change to `serve_app`. The cost is one more proxy hop
(a few ms, see FACTS.md).

Every setting is `user_config` (`RouterConfig`), so weight changes are applied by `reconfigure`
in place: the router's replicas are never restarted and in-flight streams are not cut.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any, AsyncIterator

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve_nb.rollout.routing import (
    EPOCH_HEADER,
    ROUTER_DEPLOYMENT,
    SERVED_BY_HEADER,
    STATUS_PATH,
    RouterConfig,
    pick_version,
)
from llmserve_nb.stats import percentile

log = logging.getLogger("ray.serve")

# Hop-by-hop headers (RFC 9110 7.6.1) and those the next hop recomputes.
_DROP_REQUEST = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                 "proxy-connection", "content-length"}
# x-request-id: the request's id is forwarded to the version (one id in both proxies' logs); the public
# proxy sets it on the answer itself.
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade", "content-length",
                  "date", "server", "x-request-id"}


CLOSE_OLD_CLIENT_AFTER_S = 900.0


class _VersionStats:
    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.unreachable = 0  # sends that never reached the version (then re-sent elsewhere or failed)
        self.broken_streams = 0  # the version's response broke off mid-body
        self.ttfb_s: collections.deque[float] = collections.deque(maxlen=2000)

    def as_dict(self) -> dict[str, Any]:
        def pct(q: float) -> float | None:
            return round(percentile(self.ttfb_s, q) * 1000, 2) if self.ttfb_s else None

        return {"requests": self.requests, "in_flight": self.in_flight, "statuses": dict(self.statuses),
                "errors_5xx": sum(n for s, n in self.statuses.items() if s.startswith("5")),
                "unreachable": self.unreachable, "broken_streams": self.broken_streams,
                "ttfb_ms_p50": pct(50), "ttfb_ms_p99": pct(99)}


class _Unreachable(Exception):
    pass


class _RelayResponse(StreamingResponse):
    """A streamed answer whose clean-up (close the version's response, count it out of in-flight) runs
    however the response ends, even when the client left before the body started."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int, on_close) -> None:
        super().__init__(content, status_code=status_code)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


@serve.deployment(name=ROUTER_DEPLOYMENT, max_ongoing_requests=1000, max_queued_requests=-1,
                  ray_actor_options={"num_cpus": 0})
class RolloutRouter:
    def __init__(self) -> None:
        self.config = RouterConfig()
        self.stats: dict[str, _VersionStats] = {}
        self.client: httpx.AsyncClient | None = None
        self._client_key: tuple | None = None
        self._rng = random.Random()
        self._closing: set[asyncio.Task] = set()
        self.started = time.time()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit tests)
            self.replica = "local"

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applied in place on every weight change: new choices use the new weights at once; requests
        already forwarded finish on the version they went to."""
        config = RouterConfig.model_validate(user_config)
        key = (config.upstream, config.request_timeout_s, config.connect_timeout_s)
        if key != self._client_key:
            old = self.client
            self.client = httpx.AsyncClient(
                base_url=config.upstream, trust_env=False,
                timeout=httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s),
                limits=httpx.Limits(max_connections=1000, max_keepalive_connections=256),
            )
            self._client_key = key
            if old is not None:  # streams still open on it finish first
                self._closing.add(asyncio.get_running_loop().create_task(self._close_later(old)))
        for v in config.versions:
            self.stats.setdefault(v.name, _VersionStats())
        self.config = config
        log.info("rollout router epoch %d: weights %s", config.epoch, config.weights())

    @staticmethod
    async def _close_later(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(CLOSE_OLD_CLIENT_AFTER_S)
        await client.aclose()

    def status(self) -> dict[str, Any]:
        return {"replica": self.replica, "epoch": self.config.epoch, "weights": self.config.weights(),
                "sticky_header": self.config.sticky_header,
                "versions": {name: s.as_dict() for name, s in self.stats.items()}}

    async def __call__(self, request: Request) -> Response:
        scope = request.scope
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        sub = path[len(root):] if root and path.startswith(root) else path
        if sub.rstrip("/") == STATUS_PATH:
            return JSONResponse(self.status())
        config = self.config
        if not config.versions:
            return JSONResponse({"error": {"message": "the rollout router has no version configured",
                                           "type": "server_error", "code": 503}}, status_code=503)
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _DROP_REQUEST]
        session = request.headers.get(config.sticky_header)
        query = scope.get("query_string", b"").decode("latin-1")
        tried: list[str] = []
        last = ""
        for _ in range(config.retries + 1):
            name = pick_version(config.weights(), session, exclude=tried, rng=self._rng)
            tried.append(name)
            version = config.version(name)
            url = version.route_prefix.rstrip("/") + (sub or "/") + (f"?{query}" if query else "")
            try:
                return await self._forward(request.method, url, headers, body, name, config.epoch)
            except _Unreachable as e:
                last = f"{name}: {e}"
                await asyncio.sleep(0.05)
        return JSONResponse({"error": {"message": f"no version could be reached ({last})", "type": "server_error",
                                       "code": 503}}, status_code=503,
                            headers={"retry-after": "1", EPOCH_HEADER: str(config.epoch)})

    async def _forward(self, method: str, url: str, headers: list, body: bytes, name: str, epoch: int) -> Response:
        stats = self.stats.setdefault(name, _VersionStats())
        assert self.client is not None
        t0 = time.perf_counter()
        stats.in_flight += 1
        handed_over = False
        try:
            try:
                resp = await self.client.send(self.client.build_request(method, url, headers=headers, content=body),
                                              stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                stats.unreachable += 1
                raise _Unreachable(f"{type(e).__name__}: {e}") from None
            if resp.status_code == 404 and resp.headers.get("content-type", "").startswith("text/plain"):
                # Serve's proxy has no route for the version (yet, or any more): the version never saw it.
                text = (await resp.aread())[:300]
                await resp.aclose()
                if b"not found. Ping" in text:
                    stats.unreachable += 1
                    raise _Unreachable(f"no route {url}")
                stats.requests += 1
                stats.statuses["404"] += 1
                return Response(text, status_code=404, headers={SERVED_BY_HEADER: name, EPOCH_HEADER: str(epoch)})
            stats.requests += 1
            stats.statuses[str(resp.status_code)] += 1
            out_headers = [(k, v) for k, v in resp.headers.raw if k.decode("latin-1").lower() not in _DROP_RESPONSE]
            out_headers += [(SERVED_BY_HEADER.encode(), name.encode()), (EPOCH_HEADER.encode(), str(epoch).encode())]
            closed = False

            async def close() -> None:
                nonlocal closed
                if not closed:
                    closed = True
                    stats.in_flight -= 1
                    await resp.aclose()

            response = _RelayResponse(self._relay(resp, stats, t0, close), resp.status_code, close)
            response.raw_headers = out_headers  # the version's own headers (content-type included), plus ours
            handed_over = True
            return response
        finally:
            if not handed_over:
                stats.in_flight -= 1

    async def _relay(self, resp: httpx.Response, stats: _VersionStats, t0: float, close) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in resp.aiter_raw():
                if first:
                    stats.ttfb_s.append(time.perf_counter() - t0)
                    first = False
                yield chunk
        except httpx.TransportError:
            stats.broken_streams += 1
            raise
        finally:
            await close()


def build_router(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve entry point. Nothing is read from `args` (a change there would restart the router's
    replicas): the whole configuration is the `user_config` of the deployment entry."""
    return RolloutRouter.bind()
