"""The handle of one deployed application: calls to its OpenAI-compatible routes, its status, updates, teardown.

It is apart from the cluster client because its calls go to Serve's HTTP proxy rather than the
dashboard, with their own timeout (`request_timeout_s`), and a call the app does not answer is
explained with Serve's own view of the app instead of surfacing as a bare timeout. What the handle
needs of its cluster is the `ServeCluster` protocol, so the cluster client, which creates handles, and
the handle do not import each other.
"""
from __future__ import annotations

import html
import os
import time
from typing import Any, Callable, Iterator, Protocol

import httpx
from httpx_sse import SSEError, connect_sse

from llmserve_nb.backends import Backend, application, backend_for
from llmserve_nb.cluster.errors import CONNECT_TIMEOUT_S, ClusterError, DeployError
from llmserve_nb.cluster.status import NOT_DEPLOYED, AppStatus
from llmserve_nb.config import API_KEY_ENV, AppConfig


class ServeCluster(Protocol):
    """What a handle needs of the cluster it runs on; `llmserve_nb.cluster.Cluster` is the implementation."""

    serve_url: str

    # The entry the cluster deploys for a config: its runtime_env may carry more (the shipped package).
    def application(self, config: AppConfig) -> dict[str, Any]: ...

    def app_status(self, name: str) -> AppStatus | None: ...

    def deploy_application(self, application: dict[str, Any]) -> None: ...

    def delete(self, app_name: str, timeout_s: float = ...) -> None: ...


class AppHandle:
    """A deployed application: its URL, a few convenience calls, status and teardown.

    Each call to the app waits at most `request_timeout_s` (an attribute: raise it for long
    generations). A call the app does not answer (timeout, connection failure, 404/5xx from Serve's
    proxy) raises ClusterError with the app's status as Serve reports it, so a deploy that left no
    healthy replica shows up as such instead of as a hang. `transport` replaces how HTTP requests leave
    (tests pass an `httpx.MockTransport`).
    """

    def __init__(self, cluster: ServeCluster, config: AppConfig, api_key: str | None = None,
                 request_timeout_s: float = 120.0, transport: httpx.BaseTransport | None = None):
        self.cluster = cluster
        self.config = config
        self.request_timeout_s = request_timeout_s
        self._http = httpx.Client(transport=transport)
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None

    # The config changes with update(); what is derived from it follows.
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str:
        return self.config.engine.model_name

    @property
    def base_url(self) -> str:
        return self.cluster.serve_url + self.config.route_prefix.rstrip("/")

    @property
    def backend(self) -> Backend:
        return backend_for(self.config)

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
    def status(self) -> AppStatus:
        """Serve's status of this app; status NOT_DEPLOYED when Serve does not know it."""
        return self.cluster.app_status(self.name) or AppStatus(self.name, status=NOT_DEPLOYED)

    def wait_running(self, timeout_s: float = 900.0, progress: Callable[[str], None] | None = print) -> None:
        """Wait until Serve runs this handle's config and the route answers; DeployError when Serve
        reports the deploy (or update) failed, with Serve's message, or after `timeout_s`."""
        t0 = time.monotonic()
        want = self.cluster.application(self.config)
        last = None
        while True:
            st = self.status()
            current = st.runs(want)
            line = st.status + (f": {st.message}" if st.message else "")
            if progress and line != last:
                progress(f"[{time.monotonic() - t0:5.1f}s] {self.name}: {line[:300]}")
                last = line
            if current and st.status == "RUNNING":
                break
            if current and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"application {self.name!r} is {st.status}: {st.serve_messages()}")
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
                if self._http.get(f"{self.base_url}/health", timeout=CONNECT_TIMEOUT_S).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise DeployError(f"{self.base_url}/health did not answer within {timeout_s:.0f}s")

    def _unsupported(self, what: str) -> ClusterError:
        return ClusterError(
            f"{what} is not available for app {self.name!r}: its {self.backend.name} backend does not support it; "
            "AppHandle.burst() and llmserve_nb.observability.monitor.LiveMonitor show its engine's batch"
        )

    def reconfigure(self, **batching: Any) -> None:
        """Change batching live (Serve user_config → replica.reconfigure); replicas are not restarted."""
        if not self.backend.live_batching:
            raise self._unsupported("live batching (max_batch_size, batch_wait_timeout_s)")
        self.update(self.config.with_overrides(**{f"batching.{k}": v for k, v in batching.items()}))

    def update(self, config: AppConfig, timeout_s: float = 900.0, progress: Callable[[str], None] | None = None) -> None:
        """Redeploy with another config of the same app (e.g. autoscaling bounds); Serve applies the diff.

        Returns once Serve reports it runs the new config; an update Serve rejects or cannot run
        (a model that does not load, no healthy replica) raises DeployError with Serve's message.
        """
        if config.name != self.name:
            raise ValueError(f"config is for app {config.name!r}, this handle is {self.name!r}")
        self.cluster.deploy_application(application(config))
        self.config = config
        self.wait_running(timeout_s=timeout_s, progress=progress)

    def shutdown(self) -> None:
        """Delete this app from the cluster (refused for an app a RayService owns)."""
        self.cluster.delete(self.name)
        self.close()

    def close(self) -> None:
        """Close the HTTP connections to the app; the app keeps running."""
        self._http.close()

    # ---- calls -----------------------------------------------------------------------------
    def unanswered_error(self, call: str, cause: str) -> ClusterError:
        """The error for a call the app did not answer, with Serve's view of the app, which says why."""
        try:
            st = self.status()
        except ClusterError as e:
            return ClusterError(f"{call}: {cause}; Serve's status of {self.name!r} is unknown as well: {e}")
        running = st.running_replicas
        state = f"Serve reports application {self.name!r} {st.status} with {running} running replica(s)"
        if st.status == "RUNNING" and running:
            hint = (f"the app looks healthy: a long generation may need more than request_timeout_s="
                    f"{self.request_timeout_s:g}, or the Serve proxy at {self.cluster.serve_url} "
                    "is not reachable from here")
        else:
            hint = st.serve_messages()
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
            return self.unanswered_error(call, cause)
        return ClusterError(f"{call} -> {cause}")

    def _transport_error(self, call: str, e: httpx.TransportError) -> ClusterError:
        if isinstance(e, httpx.TimeoutException):
            return self.unanswered_error(call, f"no answer within request_timeout_s={self.request_timeout_s:g}s")
        return self.unanswered_error(call, f"cannot reach the Serve proxy ({type(e).__name__}: {e})")

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        call = f"{method} {self.base_url}{path}"
        try:
            r = self._http.request(method, f"{self.base_url}{path}", timeout=self._timeout(), **kw)
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
        by `request_timeout_s`. An error the server sends inside the stream raises ClusterError with its message."""
        params.setdefault("temperature", 0.0)
        body = {"model": self.model, "messages": self._messages(content), "stream": True, **params}
        url = f"{self.base_url}/v1/chat/completions"
        call = f"POST {url} (stream)"
        try:
            with connect_sse(self._http, "POST", url, json=body, timeout=self._timeout()) as events:
                if events.response.status_code >= 400:
                    events.response.read()
                    raise self._refused(call, events.response)
                for event in events.iter_sse():
                    if event.data == "[DONE]":
                        return
                    data = event.json()
                    if "error" in data:
                        raise ClusterError(f"{call}: the stream failed: {data['error']['message']}")
                    for choice in data.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            yield choice["delta"]["content"]
        except SSEError as e:  # an httpx.TransportError too, but the app did answer: not with a stream
            raise ClusterError(f"{call}: the answer is not an event stream: {e}") from None
        except httpx.TransportError as e:
            raise self._transport_error(call, e) from None

    def openai_client(self):
        """The official `openai` client pointed at this app, with the same timeout."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "not-needed", max_retries=0,
                             timeout=self.request_timeout_s)

    def stats(self) -> dict[str, Any]:
        """Batching statistics of the replica that answers (each replica keeps its own)."""
        if not self.backend.replica_stats:
            raise self._unsupported("/stats")
        return self._request("GET", "/stats").json()

    def burst(self, n: int = 16, max_tokens: int = 32, input_tokens: int = 16) -> dict[str, Any]:
        """Send `n` completions at once and report the batches the engine formed for them (how it reads
        them depends on the backend: see its `burst`)."""
        return self.backend.burst(self, n=n, max_tokens=max_tokens, input_tokens=input_tokens)

    def _repr_html_(self) -> str:
        try:
            st = self.status()
        except ClusterError as e:
            st = AppStatus(self.name, status=f"unknown ({e})")
        dep = st.deployment(self.backend.model_deployment(self.config))
        rows = [
            ("app", self.name), ("model", self.model), ("base_url", self.base_url),
            ("status", st.status), ("replicas", ", ".join(r.state for r in dep.replicas) or "-"),
            ("batching", self.config.batching.model_dump()),
            ("resources / replica", self.config.ray_actor_options()),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        return f"<table>{body}</table>"

    def __repr__(self) -> str:
        return f"AppHandle(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"
