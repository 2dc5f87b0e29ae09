"""Trace replay: a user's own traffic (send times and lengths from a JSONL file) sent at its timestamps."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve_nb.bench.results import BenchRun
from llmserve_nb.bench.runner import _arun, _run_sync
from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.workload import Workload


@dataclass(frozen=True)
class TraceRequest:
    """One line of a trace; `timestamp_s` counts from the trace's earliest timestamp."""

    timestamp_s: float
    input_tokens: int
    output_tokens: int
    prompt: str | None = None


def load_trace(path: str | Path) -> list[TraceRequest]:
    """The requests of a JSONL trace, ordered by time.

    Each non-blank line is an object with `timestamp` (seconds, relative or absolute: the earliest is
    taken as 0), `input_tokens` and `output_tokens` (positive integers; output is sent as
    `max_tokens`) and optionally `prompt` (text sent as is; without it a seeded prompt of
    `input_tokens` tokens is made). Other keys are ignored. A bad line raises ValueError naming it.
    """
    path = Path(path)
    rows: list[tuple[float, int, int, str | None]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rows.append(_parse_line(line, f"{path}:{lineno}"))
    if not rows:
        raise ValueError(f"{path}: the trace holds no requests")
    t0 = min(r[0] for r in rows)
    # A stable sort: merged traces need not be in order, and equal timestamps keep their file order.
    return [TraceRequest(t - t0, n_in, n_out, prompt) for t, n_in, n_out, prompt in sorted(rows, key=lambda r: r[0])]


def _parse_line(line: str, where: str) -> tuple[float, int, int, str | None]:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("timestamp", "input_tokens", "output_tokens") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (each line needs timestamp, input_tokens, "
                         "output_tokens)")
    t = obj["timestamp"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"{where}: timestamp must be a number of seconds, got {t!r}")
    lengths = []
    for key in ("input_tokens", "output_tokens"):
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {v!r}")
        lengths.append(v)
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    return float(t), lengths[0], lengths[1], prompt


def replay(
    url: str,
    trace: str | Path | list[TraceRequest],
    workload: Workload | None = None,
    *,
    time_scale: float = 1.0,
    model: str | None = None,
    label: str = "trace",
    progress: bool = True,
    tokenizer: Any = None,
    api_key: str | None = None,
    slo: SLO | None = None,
) -> BenchRun:
    """Send each request of `trace` (a JSONL path, or `load_trace`'s list) at its timestamp × `time_scale`.

    `time_scale` 0.5 replays twice as fast. `workload` says how to send (endpoint, streaming, EOS,
    timeouts, seed of the made-up prompts, a shared prefix); the trace replaces its count and lengths.
    Its `duration_s` still bounds the run: requests due after it are not sent, so give a duration that
    covers the (scaled) trace. The run's `rate` is the trace's mean rate; `arrival` is "trace".
    """
    if not 0 < time_scale < math.inf:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    reqs = load_trace(trace) if isinstance(trace, (str, Path)) else sorted(trace, key=lambda r: r.timestamp_s)
    if not reqs:
        raise ValueError("the trace holds no requests")
    wl = dataclasses.replace(workload or Workload(), num_requests=len(reqs))
    made = wl.prompts([r.input_tokens for r in reqs])
    items = [(r.prompt, r.input_tokens, r.output_tokens) if r.prompt is not None
             else (made[i], wl.shared_prefix_tokens + r.input_tokens, r.output_tokens) for i, r in enumerate(reqs)]
    schedule = [(r.timestamp_s - reqs[0].timestamp_s) * time_scale for r in reqs]
    rate = (len(reqs) - 1) / schedule[-1] if schedule[-1] > 0 else None
    return _run_sync(_arun(url, wl, items, None, schedule, model, f"trace x{time_scale:g}", label, progress,
                           tokenizer, api_key, slo=slo, rate=rate, arrival="trace"))
