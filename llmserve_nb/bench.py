"""Streaming-aware load generator for OpenAI-compatible servers (ours, vLLM, a plain FastAPI monolith).

Drives `POST {url}/v1/completions` (or `/v1/chat/completions`) over HTTP with httpx/asyncio, in a
closed loop (a fixed number of concurrent users, each sending its next request when the previous one
ends) or an open loop (Poisson arrivals at a fixed rate, seeded). Every run is bounded by a request
count AND a duration, so it always stops by itself.

Metric definitions (the same as vLLM `benchmark_serving`, LLMPerf and GuideLLM):

- **TTFT** (time to first token): from sending the request to the arrival of the first SSE chunk
  that carries generated text. A server that does not stream (answers plain JSON) has TTFT = e2e,
  because that is when the client sees its first token.
- **e2e** latency: from sending the request to the end of the response (`data: [DONE]`).
- **ITL** (inter-token latency): the gaps between successive text-carrying chunks, pooled over all
  requests. Servers may put several tokens in one chunk, so this is strictly an inter-*chunk*
  latency; it equals the inter-token latency only when each chunk holds one token.
- **TPOT** (time per output token, after the first): `(e2e - TTFT) / (output_tokens - 1)`, per
  request. It is exact whatever the chunking, which is why it is the headline decode-speed number.
  Undefined (NaN) for a server that does not stream.
- **output tokens**: the server's `usage.completion_tokens` (requested with
  `stream_options.include_usage`); without usage, a tokenizer's count if one was given, else the
  number of text chunks. **input tokens**: `usage.prompt_tokens`, else the workload's nominal length.
- **throughput**: output tok/s = total output tokens of completed requests / wall duration of the
  run (first send to last completion); req/s likewise.
- **errors**, counted per kind: `connect` (nothing listening, refused, connect timeout), `http_4xx`,
  `http_5xx`, `timeout` (the per-request timeout), `bad_stream` (non-JSON SSE data, an error event in
  the stream, a stream that ends without `[DONE]`, a dropped connection), `other` (anything else,
  with its message). Requests still running when the duration ends are `incomplete`, not errors.

Requests send `ignore_eos: true` and `max_tokens` so every server generates the same number of
tokens; a server may ignore `ignore_eos`, so the actual output token count is measured, and
`short_outputs` counts the completed requests that returned fewer tokens than asked for.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

import httpx

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ERROR_KINDS",
    "BenchReport",
    "BenchRun",
    "RequestResult",
    "Workload",
    "add_cli",
    "compare_configs",
    "make_prompts",
    "plot_latency_cdf",
    "plot_throughput_latency",
    "plot_ttft_vs_concurrency",
    "ratio_table",
    "run_benchmark",
    "sweep",
    "to_markdown",
]

ERROR_KINDS = ("connect", "http_4xx", "http_5xx", "timeout", "bad_stream", "other")

# Each word is one token (with its leading space) in SmolLM2's tokenizer and the prefix "Story:" is
# two, so a prompt of N tokens is exact for the embedded model and close for other BPE tokenizers.
_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but first one their its new after who they have been also other two more time years city world people "
    "made state year used during part until there most many school known three water river house music family "
    "name team early work film game life second later day north south east west found war small since best town "
    "great high book light road park green blue black white red old long big good place home land sea stone tree "
    "bird fish horse field story song king queen garden window door table chair paper letter morning evening "
    "night summer winter spring autumn rain snow wind cloud star moon sun mountain valley island forest lake "
    "bridge street market village church castle ship train car plane friend child mother father brother sister "
    "teacher doctor farmer soldier artist writer painter singer dancer player student worker leader member group "
    "power energy money price value number line point order form change model system process level area"
).split()
_PROMPT_PREFIX, _PROMPT_PREFIX_TOKENS = "Story:", 2

Length = int | tuple[int, int]


def make_prompts(n: int, input_tokens: Length = 30, seed: int = 0) -> list[str]:
    """`n` deterministic prompts of `input_tokens` tokens (an int, or an inclusive (lo, hi) range)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = _draw(rng, input_tokens)
        if k <= _PROMPT_PREFIX_TOKENS:
            prompts.append("".join(" " + rng.choice(_WORDS) for _ in range(k)).lstrip())
        else:
            prompts.append(_PROMPT_PREFIX + "".join(" " + rng.choice(_WORDS) for _ in range(k - _PROMPT_PREFIX_TOKENS)))
    return prompts


def _draw(rng: random.Random, length: Length) -> int:
    if isinstance(length, int):
        return length
    lo, hi = length
    return rng.randint(lo, hi)


@dataclass
class Workload:
    """What to send: the same Workload (same seed) yields the same prompts and lengths on every server.

    `input_tokens` / `output_tokens` are an int or an inclusive (lo, hi) range drawn per request.
    `duration_s` bounds each run (one concurrency level or rate); `timeout_s` bounds each request.
    `endpoint` is "completions" (prompt = the text) or "chat" (one user message; the chat template
    adds its own tokens on top of `input_tokens`).
    """

    num_requests: int = 32
    input_tokens: Length = 30
    output_tokens: Length = 64
    duration_s: float = 300.0
    timeout_s: float = 120.0
    endpoint: Literal["completions", "chat"] = "completions"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be > 0")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if isinstance(self.input_tokens, list):
            self.input_tokens = tuple(self.input_tokens)
        if isinstance(self.output_tokens, list):
            self.output_tokens = tuple(self.output_tokens)

    @property
    def path(self) -> str:
        return "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"

    def items(self) -> list[tuple[str, int, int]]:
        """(prompt, nominal input tokens, max_tokens) per request, deterministic in `seed`."""
        rng = random.Random(self.seed)
        ins = [_draw(rng, self.input_tokens) for _ in range(self.num_requests)]
        outs = [_draw(rng, self.output_tokens) for _ in range(self.num_requests)]
        prompts = [make_prompts(1, k, seed=self.seed * 100003 + i)[0] for i, k in enumerate(ins)]
        return list(zip(prompts, ins, outs))

    def body(self, prompt: str, max_tokens: int, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.temperature, "stream": self.stream}
        if model:
            body["model"] = model
        if self.endpoint == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


@dataclass
class RequestResult:
    """One request. Times are seconds; `start_s` is from the start of the run, the rest from `start_s`."""

    index: int
    status: Literal["pending", "ok", "error", "incomplete"] = "pending"
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None
    start_s: float = math.nan
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    chunk_times_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    tokens_from: Literal["usage", "tokenizer", "chunks", ""] = ""
    streamed: bool = False

    @property
    def tpot_s(self) -> float:
        """(e2e - TTFT) / (output_tokens - 1); NaN for fewer than two tokens or an unstreamed answer."""
        if self.status != "ok" or self.output_tokens < 2 or not self.streamed:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive text-carrying chunks (inter-chunk latency)."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def row(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "chunk_times_s"}
        d["tpot_s"] = self.tpot_s
        d["chunks"] = len(self.chunk_times_s)
        return d


class _BadStream(Exception):
    pass


class _HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, _HTTPError):
        return ("http_4xx" if exc.status < 500 else "http_5xx"), str(exc)
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return "timeout", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (_BadStream, httpx.RemoteProtocolError, httpx.ReadError)):
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


async def _send(client: httpx.AsyncClient, path: str, body: dict, rr: RequestResult, endpoint: str, tokenizer) -> None:
    """Fill `rr` from one request; raises on failure (classified by the caller)."""
    t0 = time.perf_counter()
    text_parts: list[str] = []
    usage = None
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
                raise _BadStream(f"response is neither SSE nor JSON: {raw[:200]!r}") from None
            if "error" in obj:
                raise _BadStream(f"error object in a 200 response: {str(obj['error'])[:300]}")
            text = _delta_text(obj, endpoint)
            text_parts.append(text)
            usage = obj.get("usage")
            rr.ttft_s = rr.e2e_s = now
            rr.chunk_times_s = [now] if text else []
        else:
            rr.streamed = True
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, event:/id: fields
                payload = line[5:].strip()
                now = time.perf_counter() - t0
                if payload == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(payload)
                except ValueError:
                    raise _BadStream(f"non-JSON SSE data: {payload[:200]!r}") from None
                if not isinstance(obj, dict):
                    raise _BadStream(f"SSE data is not an object: {payload[:200]!r}")
                if "error" in obj:
                    raise _BadStream(f"error event in stream: {str(obj['error'])[:300]}")
                if obj.get("usage"):
                    usage = obj["usage"]
                text = _delta_text(obj, endpoint)
                if text:
                    if not rr.chunk_times_s:
                        rr.ttft_s = now
                    rr.chunk_times_s.append(now)
                    text_parts.append(text)
            if not done:
                raise _BadStream(f"stream ended without [DONE] after {len(rr.chunk_times_s)} chunks")
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


async def _one(client, wl: Workload, model, item, rr: RequestResult, t_run: float, tokenizer) -> None:
    prompt, n_in, n_out = item
    rr.input_tokens, rr.expected_output_tokens = n_in, n_out
    rr.start_s = time.perf_counter() - t_run
    try:
        await asyncio.wait_for(_send(client, wl.path, wl.body(prompt, n_out, model), rr, wl.endpoint, tokenizer), wl.timeout_s)
        rr.status = "ok"
    except asyncio.CancelledError:
        rr.status = "incomplete"
        raise
    except Exception as e:  # every failure becomes a counted error kind, never a crashed run
        rr.status = "error"
        rr.error_kind, rr.error = _classify(e)


@dataclass
class BenchRun:
    """One run at one load level: per-request results plus how it was driven."""

    label: str
    url: str
    model: str | None
    workload: Workload
    concurrency: int | None
    rate: float | None
    duration_s: float
    results: list[RequestResult]

    def summary(self) -> dict[str, Any]:
        """Aggregates (latencies in ms). See the module docstring for each definition."""
        ok = [r for r in self.results if r.status == "ok"]
        err = [r for r in self.results if r.status == "error"]
        dur = self.duration_s if self.duration_s > 0 else math.nan
        out_tok = sum(r.output_tokens for r in ok)
        s: dict[str, Any] = {
            "label": self.label,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": len(self.results),
            "completed": len(ok),
            "errors": len(err),
            "incomplete": sum(r.status == "incomplete" for r in self.results),
        }
        for kind in ERROR_KINDS:
            s[f"err_{kind}"] = sum(r.error_kind == kind for r in err)
        s.update(
            duration_s=self.duration_s,
            req_per_s=len(ok) / dur,
            output_tok_per_s=out_tok / dur,
            input_tok_per_s=sum(r.input_tokens for r in ok) / dur,
            mean_output_tokens=out_tok / len(ok) if ok else math.nan,
            short_outputs=sum(r.output_tokens < r.expected_output_tokens for r in ok),
        )
        series = {
            "ttft": [r.ttft_s for r in ok],
            "tpot": [r.tpot_s for r in ok],
            "itl": [g for r in ok for g in r.itl_s],
            "e2e": [r.e2e_s for r in ok],
        }
        for name, values in series.items():
            ms = [v * 1000 for v in values if not math.isnan(v)]
            s[f"{name}_ms_mean"] = sum(ms) / len(ms) if ms else math.nan
            for q in (50, 90, 99):
                s[f"{name}_ms_p{q}"] = _percentile(ms, q)
        s["error_example"] = next((f"{r.error_kind}: {r.error}" for r in err), "")
        return s

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        df = pd.DataFrame([r.row() for r in self.results])
        df.insert(0, "label", self.label)
        df.insert(1, "concurrency", self.concurrency)
        df.insert(2, "rate", self.rate)
        return df

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "url": self.url,
            "model": self.model,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "workload": asdict(self.workload),
            "summary": self.summary(),
            "requests": [asdict(r) for r in self.results],
        }


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM uses)."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class BenchReport:
    """Several runs (a sweep, or sweeps of several servers/configs) with table and file output."""

    runs: list[BenchRun] = field(default_factory=list)

    def __add__(self, other: BenchReport) -> BenchReport:
        return BenchReport(self.runs + other.runs)

    def summary(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([r.summary() for r in self.runs])

    def requests(self) -> pd.DataFrame:
        import pandas as pd

        frames = [r.to_frame() for r in self.runs]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({"runs": [r.to_dict() for r in self.runs]})

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write summary.csv, requests.csv and report.json (strict JSON: NaN becomes null)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"summary": out / "summary.csv", "requests": out / "requests.csv", "report": out / "report.json"}
        self.summary().to_csv(paths["summary"], index=False)
        self.requests().to_csv(paths["requests"], index=False)
        paths["report"].write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return paths


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---- driving ------------------------------------------------------------------------------

def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _client(url: str, wl: Workload, max_connections: int, api_key: str | None) -> httpx.AsyncClient:
    # trust_env=False: an HTTP(S)_PROXY in the environment must never capture loopback benchmark traffic.
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers=_headers(api_key),
        trust_env=False,
        timeout=httpx.Timeout(wl.timeout_s, connect=min(10.0, wl.timeout_s)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


async def _discover_model(url: str, api_key: str | None) -> str | None:
    """The first id of GET /v1/models; None when unreachable (the run then reports the real error)."""
    try:
        async with httpx.AsyncClient(headers=_headers(api_key), trust_env=False, timeout=5.0) as c:
            r = await c.get(url.rstrip("/") + "/v1/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


async def _arun(url, wl: Workload, concurrency, rate, model, label, progress, tokenizer, arrival_seed, api_key) -> BenchRun:
    from tqdm.auto import tqdm

    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop, req/s)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate}")
    if model is None:
        model = await _discover_model(url, api_key)
    items = wl.items()
    results: list[RequestResult] = []
    level = f"c={concurrency}" if concurrency is not None else f"rate={rate:g}/s"
    bar = tqdm(total=wl.num_requests, desc=f"{label} {level}", disable=not progress, leave=True)
    errors = 0

    async with _client(url, wl, concurrency or 1024, api_key) as client:
        t_run = time.perf_counter()
        deadline = t_run + wl.duration_s

        async def launch(i: int) -> None:
            nonlocal errors
            rr = RequestResult(index=i)
            results.append(rr)
            await _one(client, wl, model, items[i], rr, t_run, tokenizer)
            errors += rr.status == "error"
            bar.update(1)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)

        if concurrency is not None:
            todo = iter(range(wl.num_requests))

            async def user() -> None:
                for i in todo:
                    if time.perf_counter() >= deadline:
                        return
                    await launch(i)

            tasks = [asyncio.create_task(user()) for _ in range(min(concurrency, wl.num_requests))]
        else:
            # Poisson process: exponential gaps, seeded so that every server sees the same schedule.
            rng = random.Random(arrival_seed)
            tasks = []
            t_next = t_run
            for i in range(wl.num_requests):
                if i:
                    t_next += rng.expovariate(rate)
                if t_next >= deadline:
                    break
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
                tasks.append(asyncio.create_task(launch(i)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        t_end = time.perf_counter()
    bar.close()
    for rr in results:
        if rr.status == "pending":  # cancelled before its first await returned
            rr.status = "incomplete"
    results.sort(key=lambda r: r.index)
    # Wall duration: first send to the last request's end (or to the cut-off when the duration ended the run).
    return BenchRun(label, url, model, wl, concurrency, rate, t_end - t_run, results)


def _run_sync(coro):
    """asyncio.run, also from inside Jupyter (whose loop is already running in this thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_benchmark(
    url: str,
    workload: Workload | None = None,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    model: str | None = None,
    label: str = "run",
    progress: bool = True,
    tokenizer: Any = None,
    arrival_seed: int = 0,
    api_key: str | None = None,
) -> BenchRun:
    """One bounded run against `url` (scheme://host:port, no /v1).

    Closed loop with `concurrency` users, or open loop with Poisson arrivals at `rate` req/s
    (seeded by `arrival_seed`). `model` defaults to the first id of GET /v1/models; `tokenizer`
    (a Hugging Face tokenizer) counts output tokens when the server returns no usage; `api_key` is
    sent as `Authorization: Bearer`.
    """
    wl = workload or Workload()
    return _run_sync(_arun(url, wl, concurrency, rate, model, label, progress, tokenizer, arrival_seed, api_key))


def sweep(
    url: str,
    workload: Workload | None = None,
    *,
    concurrency: Iterable[int] | None = (1, 8, 32),
    rates: Iterable[float] | None = None,
    model: str | None = None,
    label: str = "run",
    warmup: int = 1,
    progress: bool = True,
    tokenizer: Any = None,
    api_key: str | None = None,
) -> BenchReport:
    """Run the workload once per concurrency level (or per rate, if `rates` is given).

    `warmup` requests are sent one at a time first and discarded, so that one-off costs (first
    forward pass, connection set-up) do not land in the first level.
    """
    wl = workload or Workload()
    if model is None:
        model = _run_sync(_discover_model(url, api_key))
    common = dict(model=model, label=label, tokenizer=tokenizer, api_key=api_key)
    if warmup:
        warm = Workload(**{**asdict(wl), "num_requests": warmup, "seed": wl.seed + 1})
        run_benchmark(url, warm, concurrency=1, progress=False, **common)
    if rates is not None:
        runs = [run_benchmark(url, wl, rate=r, progress=progress, **common) for r in rates]
    else:
        runs = [run_benchmark(url, wl, concurrency=c, progress=progress, **common) for c in concurrency or ()]
    return BenchReport(runs)


# ---- comparing ----------------------------------------------------------------------------

_RATIO_METRICS = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50")


def ratio_table(summary: pd.DataFrame, baseline: str | None = None, metrics: Sequence[str] = _RATIO_METRICS) -> pd.DataFrame:
    """Each row's metrics divided by the baseline label's at the same concurrency/rate.

    Adds `<metric>_ratio` columns (baseline = the first label when not given). A throughput ratio
    above 1 and latency ratios below 1 mean better than the baseline.
    """
    df = summary.copy()
    baseline = baseline if baseline is not None else df["label"].iloc[0]
    level = "concurrency" if df["concurrency"].notna().any() else "rate"
    base = df[df["label"] == baseline].set_index(level)
    for m in metrics:
        ref = df[level].map(base[m])
        df[f"{m}_ratio"] = df[m] / ref
    return df


def _config_label(config, first) -> str:
    """The dotted fields where `config` differs from `first`, e.g. 'batching.max_batch_size=1'."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(first.model_dump(mode="json"))), dict(flat(config.model_dump(mode="json")))
    diff = [f"{k}={b[k]}" for k in b if a.get(k) != b[k]]
    return ", ".join(diff) or "baseline"


def compare_configs(
    cluster,
    configs: Sequence[Any],
    workload: Workload | None = None,
    *,
    concurrency: Iterable[int] = (1, 8),
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Deploy each config in turn on `cluster`, run the same sweep, shut it down; ratios to the first.

    `configs` holds `AppConfig`s or `(label, AppConfig)` pairs; unlabelled ones are named after the
    fields where they differ from the first. Returns `ratio_table` of the combined summary, baseline
    = the first config; with `out_dir`, each config's files land in `out_dir/<n>-<label>/`.
    """
    wl = workload or Workload()
    levels = list(concurrency)
    pairs = [c if isinstance(c, tuple) else (None, c) for c in configs]
    if not pairs:
        raise ValueError("compare_configs needs at least one config")
    first = pairs[0][1]
    report = BenchReport()
    for n, (label, cfg) in enumerate(pairs):
        label = label or _config_label(cfg, first)
        app = cluster.deploy(cfg)
        try:
            part = sweep(app.base_url, wl, concurrency=levels, model=app.model, label=label, progress=progress,
                         api_key=getattr(app, "api_key", None))
        finally:
            app.shutdown()
        if out_dir is not None:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:60]
            part.save(Path(out_dir) / f"{n}-{safe}")
        report = report + part
    return ratio_table(report.summary())


# ---- presenting ---------------------------------------------------------------------------

def to_markdown(df: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 2) -> str:
    """A GitHub-markdown table (no `tabulate` dependency)."""
    cols = list(columns) if columns is not None else list(df.columns)

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


def _summary_of(x) -> pd.DataFrame:
    return x.summary() if isinstance(x, BenchReport) else x


def plot_throughput_latency(results, latency: str = "e2e_ms_p50", ax=None):
    """Output tok/s (x) against a latency column (y), one line per label, points marked by level."""
    import matplotlib.pyplot as plt

    df = _summary_of(results)
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    level = "concurrency" if df["concurrency"].notna().any() else "rate"
    for label, g in df.groupby("label", sort=False):
        g = g.sort_values(level)
        ax.plot(g["output_tok_per_s"], g[latency], marker="o", label=label)
        for _, r in g.iterrows():
            ax.annotate(f"{r[level]:g}", (r["output_tok_per_s"], r[latency]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel(latency.replace("_", " "))
    ax.set_title(f"throughput vs latency (points: {level})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_latency_cdf(report: BenchReport, metric: Literal["e2e", "ttft", "tpot"] = "e2e", ax=None):
    """Empirical CDF of a per-request latency, one curve per run."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for run in report.runs:
        ok = [r for r in run.results if r.status == "ok"]
        vals = sorted(v * 1000 for v in (getattr(r, f"{metric}_s") for r in ok) if not math.isnan(v))
        if not vals:
            continue
        level = f"c={run.concurrency}" if run.concurrency is not None else f"{run.rate:g} req/s"
        ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=f"{run.label} {level}")
    ax.set_xlabel(f"{metric} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{metric} CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_ttft_vs_concurrency(results, ax=None):
    """TTFT p50 (solid) and p90 (dashed) against concurrency, one colour per label."""
    import matplotlib.pyplot as plt

    df = _summary_of(results)
    df = df[df["concurrency"].notna()]
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for label, g in df.groupby("label", sort=False):
        g = g.sort_values("concurrency")
        (line,) = ax.plot(g["concurrency"], g["ttft_ms_p50"], marker="o", label=f"{label} p50")
        ax.plot(g["concurrency"], g["ttft_ms_p90"], ls="--", color=line.get_color(), label=f"{label} p90")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


# ---- CLI ----------------------------------------------------------------------------------

_TABLE_COLUMNS = (
    "label", "concurrency", "rate", "completed", "errors", "incomplete", "req_per_s", "output_tok_per_s",
    "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p50", "e2e_ms_p50", "e2e_ms_p99",
)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _length(s: str) -> Length:
    if "-" in s:
        lo, hi = s.split("-", 1)
        return int(lo), int(hi)
    return int(s)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, e2e, tok/s)",
        description="Closed-loop sweep over --concurrency levels, or open loop at --rate req/s (Poisson).",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL, without /v1")
    p.add_argument("--model", help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("LLMSERVE_NB_API_KEY"),
                   help="sent as 'Authorization: Bearer' (default: $LLMSERVE_NB_API_KEY)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="comma list, e.g. 1,8,32")
    load.add_argument("--rate", type=_floats, help="comma list of Poisson arrival rates in req/s (open loop)")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--duration", type=float, default=300.0, help="seconds per level before in-flight requests are cut")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    p.add_argument("--input-tokens", type=_length, default=30, help="N or LO-HI")
    p.add_argument("--max-tokens", type=_length, default=64, help="N or LO-HI (sent with ignore_eos)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--no-stream", action="store_true", help="ask for plain JSON responses")
    p.add_argument("--no-ignore-eos", action="store_true", help="let generation stop at EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="discarded requests before the first level")
    p.add_argument("--label", default="run")
    p.add_argument("--out", help="directory for summary.csv, requests.csv, report.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli_bench)


def _cli_bench(args) -> int:
    wl = Workload(
        num_requests=args.requests, input_tokens=args.input_tokens, output_tokens=args.max_tokens,
        duration_s=args.duration, timeout_s=args.timeout, endpoint=args.endpoint, stream=not args.no_stream,
        ignore_eos=not args.no_ignore_eos, seed=args.seed,
    )
    report = sweep(
        args.url, wl, concurrency=None if args.rate else args.concurrency, rates=args.rate, model=args.model,
        label=args.label, warmup=args.warmup, progress=not args.no_progress, api_key=args.api_key,
    )
    summary = report.summary()
    print(to_markdown(summary, _TABLE_COLUMNS))
    if args.out:
        paths = report.save(args.out)
        print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    failed = summary[summary["errors"] > 0]
    for _, row in failed.iterrows():
        kinds = ", ".join(f"{k}={row[f'err_{k}']}" for k in ERROR_KINDS if row[f"err_{k}"])
        print(f"{row['label']} c={row['concurrency']} rate={row['rate']}: {row['errors']} errors ({kinds}); "
              f"e.g. {row['error_example']}", file=sys.stderr)
    if summary["completed"].sum() == 0:
        print(f"error: no request to {args.url} completed", file=sys.stderr)
        return 1
    return 0
