"""One request over HTTP: SSE (or plain JSON) parsing, timings, token counts, failure classification."""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import httpx
from httpx_sse import EventSource

from llmserve_nb.bench.results import RequestResult
from llmserve_nb.bench.workload import Workload


class BadStream(Exception):
    """An answer that is not a well-formed OpenAI stream (or JSON body)."""


class _HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def classify(exc: BaseException) -> tuple[str, str]:
    """(error kind, message) of a failed request; the kinds are `metrics.ERROR_KINDS`."""
    if isinstance(exc, _HTTPError):
        return ("http_4xx" if exc.status < 500 else "http_5xx"), str(exc)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (BadStream, httpx.RemoteProtocolError, httpx.ReadError)):
        return "bad_stream", f"{type(exc).__name__}: {exc}"
    return "other", f"{type(exc).__name__}: {exc}"


def _delta_text(obj: dict, endpoint: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if endpoint == "completions":
        return c.get("text") or ""
    return (c.get("delta") or c.get("message") or {}).get("content") or ""


async def sse_objects(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON object of each event of an OpenAI-style event stream, up to `data: [DONE]`. BadStream for
    data that is not a JSON object, an error event, or a stream that ends without [DONE]. httpx-sse
    assembles the events (multi-line data, comments, event:/id: fields) as the SSE spec says."""
    # aclosing: a consumer that stops early (a drop, an error) ends the event reader before the response.
    async with aclosing(EventSource(resp).aiter_sse()) as events:
        async for event in events:
            payload = event.data.strip()
            if payload == "[DONE]":
                return
            try:
                obj = json.loads(payload)
            except ValueError:
                raise BadStream(f"non-JSON SSE data: {payload[:200]!r}") from None
            if not isinstance(obj, dict):
                raise BadStream(f"SSE data is not an object: {payload[:200]!r}")
            if "error" in obj:
                raise BadStream(f"error event in stream: {str(obj['error'])[:300]}")
            yield obj
    raise BadStream("stream ended without [DONE]")


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_client(url: str, wl: Workload, max_connections: int, api_key: str | None) -> httpx.AsyncClient:
    # trust_env=False: an HTTP(S)_PROXY in the environment must never capture loopback benchmark traffic.
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers=headers(api_key),
        trust_env=False,
        timeout=httpx.Timeout(wl.timeout_s, connect=min(10.0, wl.timeout_s)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def discover_model(url: str, api_key: str | None) -> str | None:
    """The first id of GET /v1/models; None when unreachable (the run then reports the real error)."""
    try:
        async with httpx.AsyncClient(headers=headers(api_key), trust_env=False, timeout=5.0) as c:
            r = await c.get(url.rstrip("/") + "/v1/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


async def _send(client: httpx.AsyncClient, path: str, body: dict, rr: RequestResult, endpoint: str, tokenizer) -> bool:
    """Fill `rr` from one request; True when the client hung up on purpose. Raises on failure."""
    t0 = time.perf_counter()
    text_parts: list[str] = []
    usage = None
    dropped = False
    async with client.stream("POST", path, json=body) as resp:
        rr.http_status = resp.status_code
        if resp.status_code >= 400:
            raise _HTTPError(resp.status_code, (await resp.aread()).decode(errors="replace"))
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            # A server that does not stream: the first token reaches the client with the last.
            raw = await resp.aread()
            now = time.perf_counter() - t0
            try:
                obj = json.loads(raw)
            except ValueError:
                raise BadStream(f"response is neither SSE nor JSON: {raw[:200]!r}") from None
            if "error" in obj:
                raise BadStream(f"error object in a 200 response: {str(obj['error'])[:300]}")
            text = _delta_text(obj, endpoint)
            text_parts.append(text)
            usage = obj.get("usage")
            rr.ttft_s = rr.e2e_s = now
            rr.chunk_times_s = [now] if text else []
        else:
            rr.streamed = True
            async with aclosing(sse_objects(resp)) as objects:
                async for obj in objects:
                    now = time.perf_counter() - t0
                    if obj.get("usage"):
                        usage = obj["usage"]
                    text = _delta_text(obj, endpoint)
                    if text:
                        if not rr.chunk_times_s:
                            rr.ttft_s = now
                        rr.chunk_times_s.append(now)
                        text_parts.append(text)
                        if rr.drop_after_chunks is not None and len(rr.chunk_times_s) >= rr.drop_after_chunks:
                            # Leaving the `async with` closes the half-read response, i.e. the connection.
                            dropped = True
                            break
            if not dropped:
                rr.e2e_s = time.perf_counter() - t0
    if usage and usage.get("completion_tokens") is not None:
        rr.output_tokens = int(usage["completion_tokens"])
        rr.tokens_from = "usage"
    elif tokenizer is not None:
        rr.output_tokens = len(tokenizer.encode("".join(text_parts), add_special_tokens=False))
        rr.tokens_from = "tokenizer"
    else:
        rr.output_tokens = len(rr.chunk_times_s)
        rr.tokens_from = "chunks"
    if usage and usage.get("prompt_tokens") is not None:
        rr.input_tokens = int(usage["prompt_tokens"])
    return dropped


async def send_one(client: httpx.AsyncClient, wl: Workload, model: str | None, item: tuple[str, int, int],
                   rr: RequestResult, t_run: float, tokenizer) -> None:
    """One request of a run: `rr` ends as ok, error (with its kind), dropped, or incomplete (cancelled)."""
    prompt, n_in, n_out = item
    rr.input_tokens, rr.expected_output_tokens = n_in, n_out
    rr.start_s = time.perf_counter() - t_run
    try:
        dropped = await asyncio.wait_for(
            _send(client, wl.path, wl.body(prompt, n_out, model), rr, wl.endpoint, tokenizer), wl.timeout_s)
        rr.status = "dropped" if dropped else "ok"
    except asyncio.CancelledError:
        rr.status = "incomplete"
        raise
    except Exception as e:  # every failure becomes a counted error kind, never a crashed run
        rr.status = "error"
        rr.error_kind, rr.error = classify(e)
    rr.end_s = time.perf_counter() - t_run
