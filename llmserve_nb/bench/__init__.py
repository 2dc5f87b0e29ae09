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
- **per-window** figures (`BenchRun.windows`, the soak report): requests belong to the window in
  which they ended; `streamed_tok_per_s` of a window counts every token streamed in it (a completed
  request's usage spread evenly over its chunks; a dropped or cut one at the completed requests'
  mean tokens per chunk), so long requests still running at the end do not understate the last window.

Workloads: the fixed-length one sends `ignore_eos: true` and `max_tokens` so every server generates
the same number of tokens; a server may ignore `ignore_eos`, so the actual output token count is
measured, and `short_outputs` counts the completed requests that returned fewer tokens than asked
for. `mixed_workload()` draws `max_tokens` per request from a seeded log-uniform distribution over
16–512 and honours EOS, so requests also end early; see `Workload`.

Modules: `workload` (what to send), `client` (one request over HTTP/SSE), `runner` (load patterns:
`run_benchmark`, `sweep`, `soak`), `results` (per-request records and aggregates), `report` (tables,
ratios, config comparison), `plots`, `cli` (`llmserve-nb bench`), and `observe` (`run_observed`: a load
with the app sampled and actions fired meanwhile, the harness every experiment runs on).
"""
from __future__ import annotations

from llmserve_nb.bench.cli import add_cli
from llmserve_nb.bench.observe import Action, Event, Timeline, run_observed
from llmserve_nb.bench.results import ERROR_KINDS, SHORT_OUTPUT_TOKENS, BenchReport, BenchRun, RequestResult
from llmserve_nb.bench.plots import plot_latency_cdf, plot_throughput_latency, plot_ttft_vs_concurrency
from llmserve_nb.bench.report import compare_configs, ratio_table, soak_table, to_markdown
from llmserve_nb.bench.runner import run_benchmark, soak, sweep
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
    "Workload",
    "add_cli",
    "compare_configs",
    "make_prompts",
    "mixed_workload",
    "plot_latency_cdf",
    "plot_throughput_latency",
    "plot_ttft_vs_concurrency",
    "ratio_table",
    "run_benchmark",
    "soak",
    "soak_table",
    "sweep",
    "to_markdown",
]
