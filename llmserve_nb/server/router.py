"""Prompt-aware routing for the transformers app: a thin HTTP ingress so Serve's request router sees the prompt.

Serve's HTTP proxy hands a deployment the ASGI scope and streams the body to the replica it has already
chosen, so a request router in front of `LLMServer` (the app's HTTP ingress) never sees the prompt, and Ray's
`PrefixCacheAffinityRouter` cannot work there. With `deployment.request_router` set to a router that reads
the prompt, `build_app` puts `LLMIngress` in front: it reads the body, finds the `prompt` or `messages` field
(what the router reads, as from Ray Serve LLM's own ingress) and calls `LLMServer.forward` through a
handle with it; the chosen replica replays the request through its own FastAPI app (`replay`), so every
route, check and error of `server.app` is unchanged, and the ASGI messages stream back. The cost is one
handle hop per request and one per batch of streamed messages (benchmarks/prefix_routing.py measures it).

Every response names the replica that answered in `REPLICA_HEADER` (`ReplicaHeader`), with or without the
ingress: for routing tests and for finding a slow replica.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve_nb.config import INGRESS_DEPLOYMENT_NAME, AppConfig

__all__ = ["REPLICA_HEADER", "ForwardedRequest", "LLMIngress", "ReplicaHeader", "replay", "routed", "routing_key"]

REPLICA_HEADER = "x-llmserve-replica"
# The parts of an HTTP scope that describe the request (the rest is per-server state, not picklable).
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
               "query_string", "headers", "client", "server")
# The body fields a prompt router reads, in the order Ray's routers look for them.
_ROUTING_FIELDS = ("messages", "prompt")


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as LLMIngress received it: its scope's describing parts and its whole body."""

    scope: dict[str, Any]
    body: bytes


def routing_key(body: bytes) -> SimpleNamespace | None:
    """What a prompt router reads: an object with the body's `messages` or `prompt` (only that one, since
    Ray's router takes the first of the two attributes it finds), or None for a body without either
    (GET /stats, a malformed body), which is then routed on load alone."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    for field in _ROUTING_FIELDS:
        if data.get(field):
            return SimpleNamespace(**{field: data[field]})
    return None


async def replay(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
    """Run `request` through `app` in this process and yield what it sends, in batches of the messages
    ready at once (a streamed response's chunks cross the handle hop together, not one by one). Closing
    the generator early (the client went away) tells the app the client disconnected and cancels it."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        outbox.put_nowait(message)

    task = asyncio.create_task(app(dict(request.scope), receive, send))
    task.add_done_callback(lambda _: outbox.put_nowait(None))
    try:
        while (message := await outbox.get()) is not None:
            batch = [message]
            while not outbox.empty() and (message := outbox.get_nowait()) is not None:
                batch.append(message)
            yield batch
            if message is None:
                break
        await task  # an error the app did not turn into a response
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class ReplicaHeader:
    """ASGI middleware: every response says which replica answered (`REPLICA_HEADER`)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._header: list[tuple[bytes, bytes]] | None = None

    def _replica_header(self) -> list[tuple[bytes, bytes]]:
        if self._header is None:
            try:
                replica = serve.get_replica_context().replica_id.unique_id
            except RayServeException:  # the app served outside Serve (FastAPI's TestClient): no replica to name
                self._header = []
            else:
                self._header = [(REPLICA_HEADER.encode(), replica.encode())]
        return self._header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._replica_header()]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


class _Relay(Response):
    """The replica's ASGI messages, sent on as they come. When the client goes away first (this task is
    cancelled), the call to the replica is cancelled too, which aborts the request there."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False
        try:
            async for batch in self.stream:
                for message in batch:
                    await send(message)
            finished = True
        finally:
            if not finished:
                self.stream.cancel()


@serve.deployment(name=INGRESS_DEPLOYMENT_NAME)
class LLMIngress:
    """The HTTP edge when the router reads the prompt: every request goes to `LLMServer.forward`, with its
    prompt (if it has one) as the call's only positional argument, where the router reads it."""

    def __init__(self, server: DeploymentHandle):
        self.server = server.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        key = routing_key(body)
        forwarded = ForwardedRequest({k: request.scope[k] for k in _SCOPE_KEYS if k in request.scope}, body)
        # Without a prompt nothing goes in the positional arguments: Ray's prefix router then picks by load
        # (it raises on arguments that hold neither field).
        return _Relay(self.server.forward.remote(*([key] if key else []), request=forwarded))


def routed(config: AppConfig, server: serve.Deployment) -> serve.Application:
    """The application for `config`: the model deployment with its router, behind LLMIngress when the
    router reads the prompt (the options the transformers backend renders in `deployments:`)."""
    app = server.options(**config.deployment_options()).bind(config.build_args())
    ingress = config.ingress_options()
    return app if ingress is None else LLMIngress.options(**ingress).bind(app)
