"""The handle of one deployed application: calls to its OpenAI-compatible routes, its status, updates, teardown.

It is apart from the cluster client because its calls go to Serve's HTTP proxy rather than the
dashboard, with their own timeout (`request_timeout_s`), and a call the app does not answer is
explained with Serve's own view of the app instead of surfacing as a bare timeout; `_same` is here
because only the handle needs to decide whether Serve already runs its config.
"""
from __future__ import annotations

import html
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import httpx

from llmserve_nb.cluster.errors import CONNECT_TIMEOUT_S, ClusterError, DeployError
from llmserve_nb.config import DEPLOYMENT_NAME, AppConfig

if TYPE_CHECKING:
    from llmserve_nb.cluster.client import Cluster


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
                "num_requests_running metric: see AppHandle.burst() or llmserve_nb.observability.monitor.LiveMonitor"
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
            from llmserve_nb.backends.vllm.render import vllm_burst

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
            from llmserve_nb.backends.vllm.render import llm_server_deployment_name

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
