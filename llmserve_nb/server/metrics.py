"""The server's metrics: Ray Serve custom metrics, named and bucketed like vLLM's.

Recorded through `ray.serve.metrics`, they leave every replica through Ray's Prometheus endpoint
(the metrics export port of each node, listed in Ray's service-discovery file), where Serve adds the
`deployment`, `replica` and `application` labels, so one query aggregates across replicas. Names and
buckets follow vLLM's (`vllm:time_to_first_token_seconds` → `ray_llmserve_time_to_first_token_seconds`)
so the same panels and alerts serve both engines.

Ray prefixes every name with `ray_` and appends `_total` to counters itself (verified on Ray 2.60's
endpoint: a counter created as `x` is exported as `ray_x_total`, gauges and histograms keep their name),
so counters are created without the suffix. Outside a Serve replica (unit tests, a plain driver)
recording is valid and simply exports nothing unless the process is a Ray worker.

`ServerMetrics` is also the replica's own bookkeeping: `as_stats()` is what `/stats` shows, read from
the same records, so the two can never disagree.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter as _Tally
from typing import Any, Callable, Iterable, Literal, Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

from llmserve_nb.observability.promql import PREFIX

__all__ = ["FinishedReason", "RequestRecord", "ServerMetrics"]

FinishedReason = Literal["stop", "length", "abort", "error"]
_REASONS = ("stop", "length", "abort", "error")

# vLLM's boundaries (vllm/v1/metrics/loggers.py), so histogram_quantile answers compare across engines.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]

class RequestRecord:
    """One request's life in a replica: create it with `ServerMetrics.request`, end it with `finish`.

    Also a context manager, the safety net for paths that fail: an exception leaving the block of an
    unfinished record finishes it as a client abort (cancellation, a closed stream: 499, "abort") or
    as an error with the exception's `status` (else 500). A clean exit leaves it open, so a route can
    hand the record on to the stream it returns, which enters it again and finishes it.
    """

    __slots__ = ("_m", "endpoint", "started", "admitted", "first_token_at", "last_token_at", "tokens_seen",
                 "finished")

    def __init__(self, metrics: ServerMetrics, endpoint: str):
        self._m = metrics
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.admitted: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tokens_seen = 0
        self.finished = False

    def first_token(self) -> None:
        """The first generated token exists (streamed or not): observes the time to first token."""
        self._m._first_token(self)

    def tokens(self, n: int = 1) -> None:
        """`n` more tokens were generated; the first call also counts as `first_token()`.

        Optional, but it makes the generation rate live during long requests instead of landing at the end.
        Safe to call from the engine's thread."""
        self._m._tokens(self, n)

    def finish(
        self,
        status_code: int,
        finished_reason: FinishedReason | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """The request is over: its HTTP status, why generation ended, its token counts.

        `finished_reason` is None for a request that never reached generation (a 4xx on validation);
        a 5xx without one counts as "error". `completion_tokens` is the truth: tokens already
        reported by `tokens()` are not counted twice. Later calls are ignored."""
        self._m._finish(self, status_code, finished_reason, prompt_tokens, completion_tokens)

    def __enter__(self) -> RequestRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.finished or exc_type is None:
            return
        if issubclass(exc_type, (GeneratorExit, asyncio.CancelledError)):
            self.finish(499, "abort", completion_tokens=self.tokens_seen)  # nginx's "client closed request"
        else:
            status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
            status = status if isinstance(status, int) else 500
            self.finish(status, "error" if status >= 500 else None, completion_tokens=self.tokens_seen)


class ServerMetrics:
    """A replica's metrics: create one per replica, in `__init__`, with the served model's name.

    Request lifecycle (each method cheap and thread-safe):
      rec = metrics.request(endpoint)     arrived: waiting
      metrics.admission_batch([recs])     batch size and queue wait; each now in the engine
      rec.tokens(n) / rec.first_token()   time to first token; live generation counter
      rec.finish(status, reason, p, c)    latency, tokens, outcome; gone from running/waiting

    `engine_stats` (e.g. the engine's `stats`) returns vLLM's `num_requests_running` (requests in
    a decode row) and `kv_cache_usage_perc`; it is read at each of these calls. Running is the
    engine's count, bounded by the requests in the engine; waiting is every other unfinished request
    (not yet admitted, or admitted and queued in the engine), as vLLM counts them. So both gauges
    come from this replica's own requests and read 0/0 when it is idle, whatever the engine lags.
    Without `engine_stats`, every admitted request counts as running.
    """

    def __init__(self, model_name: str, engine_stats: Callable[[], Mapping[str, Any]] | None = None):
        tags = ("model_name",)

        def histogram(name: str, description: str, buckets: list[float]) -> Histogram:
            return Histogram(f"llmserve_{name}", description, boundaries=buckets, tag_keys=tags)

        self._ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self._tpot = histogram("request_time_per_output_token_seconds",
                               "Per request: mean time per output token after the first, in seconds.", TPOT_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency in the replica, in seconds.",
                              E2E_BUCKETS)
        self._batch = histogram("admission_batch_size", "Requests per admission batch (prefilled together).",
                                BATCH_BUCKETS)
        self._prompt_tokens = Counter("llmserve_prompt_tokens", "Prompt tokens processed.", tags)
        self._generation_tokens = Counter("llmserve_generation_tokens", "Tokens generated.", tags)
        self._success = Counter("llmserve_request_success", "Requests finished, by finished_reason.",
                                (*tags, "finished_reason"))
        self._http = Counter("llmserve_http_requests", "HTTP requests answered, by endpoint and status code.",
                             (*tags, "endpoint", "status"))
        self._running = Gauge("llmserve_num_requests_running", "Requests in the engine's decode batch.", tags)
        self._waiting = Gauge("llmserve_num_requests_waiting", "Requests received, not in the decode batch yet.", tags)
        self._kv = Gauge("llmserve_kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", tags)
        # The engine's prefix cache (vLLM's prefix_cache_queries/hits count tokens, so do these).
        self._prefix_counters = {
            "queried_tokens": Counter("llmserve_prefix_cache_queries", "Prefix cache: prompt tokens looked up.", tags),
            "hit_tokens": Counter("llmserve_prefix_cache_hits", "Prefix cache: prompt tokens found cached.", tags),
            "evictions": Counter("llmserve_prefix_cache_evictions", "Prefix cache: blocks evicted.", tags),
        }
        self._prefix_gauges = {
            "bytes": Gauge("llmserve_prefix_cache_bytes", "Prefix cache: bytes of KV held.", tags),
            "budget_bytes": Gauge("llmserve_prefix_cache_budget_bytes", "Prefix cache: its memory budget.", tags),
            "blocks": Gauge("llmserve_prefix_cache_blocks", "Prefix cache: blocks held.", tags),
        }
        self._prefix_seen = dict.fromkeys(self._prefix_counters, 0)  # the engine's totals last exported
        self._metrics = (self._ttft, self._tpot, self._e2e, self._batch, self._prompt_tokens, self._generation_tokens,
                         self._success, self._http, self._running, self._waiting, self._kv,
                         *self._prefix_counters.values(), *self._prefix_gauges.values())
        for metric in self._metrics:
            # ray.serve.metrics' set_default_tags adds Serve's tags and returns None: not chainable.
            metric.set_default_tags({"model_name": model_name})
        self.model_name = model_name
        self._engine_stats = engine_stats
        self._lock = threading.Lock()
        self._n_arrived = 0  # not admitted yet
        self._n_admitted = 0  # admitted, not finished
        self.running = 0  # the figures last exported, as the two gauges read
        self.waiting = 0
        self._batch_sizes: _Tally[int] = _Tally()
        self._queue_wait_s = 0.0
        self._generated = 0
        # Series exist from the start, so a query reads 0 rather than "no data" on an idle replica.
        self._kv.set(0.0)
        self._publish_load()

    # ---- recording ------------------------------------------------------------------------------
    def request(self, endpoint: str) -> RequestRecord:
        """A request arrived at `endpoint` (the route, e.g. "/v1/chat/completions"): call it first thing."""
        rec = RequestRecord(self, endpoint)
        with self._lock:
            self._n_arrived += 1
        self._publish_load()
        return rec

    def admission_batch(self, records: Iterable[RequestRecord]) -> None:
        """These requests were admitted to the engine together (one `@serve.batch` call), one entry per
        batched job: a request with several prompts appears once per prompt, here or in later batches."""
        now = time.perf_counter()
        records = list(records)
        if not records:
            return
        with self._lock:
            for rec in records:
                self._queue_wait_s += now - rec.started
                if rec.admitted is None and not rec.finished:
                    rec.admitted = now
                    self._n_arrived -= 1
                    self._n_admitted += 1
            self._batch_sizes[len(records)] += 1
        self._publish_load()
        self._batch.observe(len(records))

    def _first_token(self, rec: RequestRecord) -> None:
        with self._lock:
            if rec.first_token_at is not None or rec.finished:
                return
            rec.first_token_at = rec.last_token_at = time.perf_counter()
        self._ttft.observe(rec.first_token_at - rec.started)

    def _tokens(self, rec: RequestRecord, n: int) -> None:
        if n <= 0:
            return
        self._first_token(rec)
        with self._lock:
            if rec.finished:
                return
            rec.tokens_seen += n
            rec.last_token_at = time.perf_counter()
            self._generated += n
        self._generation_tokens.inc(n)

    def _finish(self, rec: RequestRecord, status_code: int, reason: str | None, prompt_tokens: int,
                completion_tokens: int) -> None:
        if reason is not None and reason not in _REASONS:
            raise ValueError(f"finished_reason {reason!r}: use one of {_REASONS} or None")
        now = time.perf_counter()
        with self._lock:
            if rec.finished:
                return
            rec.finished = True
            if rec.admitted is None:
                self._n_arrived -= 1
            else:
                self._n_admitted -= 1
            unreported = completion_tokens - rec.tokens_seen
            if unreported > 0:
                self._generated += unreported
        self._publish_load()
        if reason is None and status_code >= 500:
            reason = "error"
        self._http.inc(tags={"endpoint": rec.endpoint, "status": str(status_code)})
        if prompt_tokens > 0:
            self._prompt_tokens.inc(prompt_tokens)
        if unreported > 0:
            self._generation_tokens.inc(unreported)
        if reason is None:
            return  # never reached generation: no latency to report
        self._success.inc(tags={"finished_reason": reason})
        self._e2e.observe(now - rec.started)
        # Timings need the first token's moment: only requests whose tokens were reported have one.
        if reason in ("stop", "length") and rec.first_token_at is not None and completion_tokens > 1:
            last = rec.last_token_at if rec.tokens_seen >= completion_tokens else now
            self._tpot.observe(max(last - rec.first_token_at, 0.0) / (completion_tokens - 1))

    def _publish_load(self) -> None:
        # The engine is read outside our lock: its own lock must never be taken while we hold ours.
        engine = self._engine_stats() if self._engine_stats is not None else {}
        with self._lock:
            in_engine = self._n_admitted
            running = min(int(engine.get("num_requests_running", in_engine)), in_engine)
            self.running, self.waiting = running, self._n_arrived + in_engine - running
            # Set under the lock, so the exported pair is always one consistent snapshot.
            self._running.set(self.running)
            self._waiting.set(self.waiting)
        if "kv_cache_usage_perc" in engine:
            self._kv.set(min(max(float(engine["kv_cache_usage_perc"]), 0.0), 1.0))
        prefix = engine.get("prefix_cache") or {}
        if prefix.get("enabled"):
            self._publish_prefix_cache(prefix)

    def _publish_prefix_cache(self, prefix: Mapping[str, Any]) -> None:
        """The engine keeps running totals; Prometheus counters take increments, so the difference from
        the totals last exported is added (under the lock: two threads must not add the same tokens)."""
        with self._lock:
            for key, counter in self._prefix_counters.items():
                delta = int(prefix.get(key, 0)) - self._prefix_seen[key]
                if delta > 0:
                    counter.inc(delta)
                    self._prefix_seen[key] += delta
            for key, gauge in self._prefix_gauges.items():
                gauge.set(float(prefix.get(key, 0)))

    # ---- replica-local view -------------------------------------------------------------------

    def as_stats(self) -> dict[str, Any]:
        """This replica's batching figures since it started: the `/stats` route's body."""
        with self._lock:
            sizes = dict(self._batch_sizes)
            wait, generated = self._queue_wait_s, self._generated
        batches = sum(sizes.values())
        jobs = sum(k * v for k, v in sizes.items())
        return {
            "batches": batches,
            "requests": jobs,  # batched jobs, as /stats has always counted them
            "batch_size_histogram": {str(k): v for k, v in sorted(sizes.items())},
            "max_batch_size_seen": max(sizes, default=0),
            "mean_batch_size": jobs / batches if batches else 0.0,
            "generated_tokens": generated,
            "mean_queue_wait_s": round(wait / jobs, 4) if jobs else 0.0,
        }
