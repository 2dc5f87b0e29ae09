"""Streaming-aware load generator for OpenAI-compatible servers (ours, vLLM, a plain FastAPI monolith).

Drives `POST {url}/v1/completions` (or `/v1/chat/completions`) over HTTP with httpx/asyncio, in a
closed loop (a fixed number of concurrent users, each sending its next request when the previous one
ends), an open loop (arrivals at a fixed mean rate, Poisson or gamma with a burstiness, seeded), or a
trace replay (each request at its timestamp from a JSONL file). Every run is bounded by a request
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
  run (first send to last completion); req/s likewise. Only completed requests count, so this is
  the *useful* output rate: tokens streamed to a client that dropped, or cut at the run's end, are
  not in it.
- **short / long requests**: a completed request is *short* when it returned at most
  `SHORT_OUTPUT_TOKENS` (32) actual output tokens, else *long*; `short_e2e_ms_p50/p99` and
  `long_e2e_ms_p50/p99` are their e2e percentiles. With EOS honoured the split is by what the server
  generated, not by what was asked for.
- **errors**, counted per kind: `connect` (nothing listening, refused, connect timeout), `http_4xx`,
  `http_5xx`, `timeout` (the per-request timeout), `bad_stream` (non-JSON SSE data, an error event in
  the stream, a stream that ends without `[DONE]`, a dropped connection), `other` (anything else,
  with its message). Requests still running when the duration ends are `incomplete`, not errors.
- **dropped**: streaming requests whose client hung up on purpose after k text chunks
  (`Workload.drop_fraction`, `drop_after_chunks`), as impatient users do. They are neither errors
  nor completed, and are left out of every latency percentile.
- **SLO and goodput** (`SLO`, vLLM's `--goodput` and GuideLLM's definition): a request is *good*
  when it completed ok and meets every bound the SLO sets: TTFT, TPOT (where defined: it does not
  apply to a one-token or unstreamed answer, as vLLM counts their TPOT as 0), ITL (every chunk gap
  of the request) and e2e. `good_requests` counts them; `goodput_req_per_s` = good requests /
  duration and `goodput_tok_per_s` = output tokens of good requests / duration (the same duration as
  throughput). `slo_attainment` = good / `slo_requests`, where `slo_requests` counts the requests
  that ended, ok or with an error (timeouts included): errors count as not good, while dropped
  clients (they left on purpose) and requests cut by the run's end (never finished, so never judged)
  are left out; 0 when no request ended. `slo_met` = attainment >= `SLO.attainment` (default 0.99).
  The summary has these keys only for a run with an SLO; without one they are absent, never NaN.
- **arrivals** (open loop): request 0 at the start, then independent gaps: exponential of mean
  1/rate (Poisson), or gamma with shape = burstiness and scale = 1/(rate * burstiness) (vLLM's
  `--burstiness`: the same mean, coefficient of variation 1/sqrt(burstiness); burstiness 1 draws the
  Poisson schedule). Requests due after the duration are not sent. A trace replay's `rate` is its mean
  rate, (requests - 1) / time span.
- **per-window** figures (`BenchRun.windows`, the soak report): requests belong to the window in
  which they ended; `streamed_tok_per_s` of a window counts every token streamed in it (a completed
  request's usage spread evenly over its chunks; a dropped or cut one at the completed requests'
  mean tokens per chunk), so long requests still running at the end do not understate the last window.

Workloads: the fixed-length one sends `ignore_eos: true` and `max_tokens` so every server generates
the same number of tokens; a server may ignore `ignore_eos`, so the actual output token count is
measured, and `short_outputs` counts the completed requests that returned fewer tokens than asked
for. `mixed_workload()` draws `max_tokens` per request from a seeded log-uniform distribution over
16–512 and honours EOS, so requests also end early; see `Workload`. `Workload(shared_prefix_tokens=N,
num_prefixes=k)` is the prefix-repetition workload (vLLM's `prefix_repetition`): each prompt is one of k
seeded N-token prefixes followed by its own `input_tokens`, for prefix caches and prefix-aware routing.

Modules: `workload` (what to send), `arrivals` (open-loop schedules), `slo` (the SLO and what is good),
`client` (one request over HTTP/SSE), `runner` (load patterns: `run_benchmark`, `sweep`, `soak`), `trace`
(`load_trace`, `replay`), `results` (per-request records and aggregates), `report` (tables, ratios,
config comparison), `plots`, `cli` (`llmserve-nb bench`), and `observe` (`run_observed`: a load with the
app sampled and actions fired meanwhile, the harness every experiment runs on).
"""
from __future__ import annotations

from llmserve_nb.bench.arrivals import arrival_times
from llmserve_nb.bench.cli import add_cli
from llmserve_nb.bench.observe import Action, Event, Timeline, run_observed
from llmserve_nb.bench.results import ERROR_KINDS, SHORT_OUTPUT_TOKENS, BenchReport, BenchRun, RequestResult
from llmserve_nb.bench.plots import plot_goodput, plot_latency_cdf, plot_throughput_latency, plot_ttft_vs_concurrency
from llmserve_nb.bench.report import compare_configs, ratio_table, soak_table, to_markdown
from llmserve_nb.bench.runner import run_benchmark, soak, sweep
from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.trace import TraceRequest, load_trace, replay
from llmserve_nb.bench.workload import Workload, make_prompts, mixed_workload

__all__ = [
    "Action",
    "Event",
    "Timeline",
    "run_observed",
    "ERROR_KINDS",
    "SHORT_OUTPUT_TOKENS",
    "BenchReport",
    "BenchRun",
    "RequestResult",
    "SLO",
    "TraceRequest",
    "Workload",
    "add_cli",
    "arrival_times",
    "compare_configs",
    "load_trace",
    "make_prompts",
    "mixed_workload",
    "plot_goodput",
    "plot_latency_cdf",
    "plot_throughput_latency",
    "plot_ttft_vs_concurrency",
    "ratio_table",
    "replay",
    "run_benchmark",
    "soak",
    "soak_table",
    "sweep",
    "to_markdown",
]
