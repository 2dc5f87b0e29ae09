"""Per-request records (`RequestResult`), one run (`BenchRun`) and several (`BenchReport`), with aggregates.

Definitions of every figure are in the package docstring (`help(llmserve_nb.bench)`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.workload import Workload
from llmserve_nb.stats import percentile

if TYPE_CHECKING:
    import pandas as pd

ERROR_KINDS = ("connect", "http_4xx", "http_5xx", "timeout", "bad_stream", "other")
# A request that returned at most this many tokens is "short": the interactive kind whose latency a
# scheduler must not sacrifice to long generations.
SHORT_OUTPUT_TOKENS = 32


@dataclass
class RequestResult:
    """One request. Times are seconds; `start_s`/`end_s` are from the start of the run, the rest from `start_s`."""

    index: int
    status: Literal["pending", "ok", "error", "incomplete", "dropped"] = "pending"
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None
    start_s: float = math.nan
    end_s: float = math.nan
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    chunk_times_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    tokens_from: Literal["usage", "tokenizer", "chunks", ""] = ""
    streamed: bool = False
    drop_after_chunks: int | None = None

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

    @property
    def short(self) -> bool:
        return self.status == "ok" and self.output_tokens <= SHORT_OUTPUT_TOKENS

    def row(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "chunk_times_s"}
        d["tpot_s"] = self.tpot_s
        d["chunks"] = len(self.chunk_times_s)
        return d


def _ms(values: Sequence[float]) -> list[float]:
    return [v * 1000 for v in values if not math.isnan(v)]


@dataclass
class BenchRun:
    """One run at one load level: per-request results plus how it was driven.

    `rate` is the open loop's mean arrival rate (for a trace replay, the trace's: requests - 1 over its
    time span), `arrival` how requests arrived ("poisson", "gamma" with `burstiness`, "trace"; None for
    a closed loop), `slo` the objective the summary reports goodput against (None: no goodput keys).
    """

    label: str
    url: str
    model: str | None
    workload: Workload
    concurrency: int | None
    rate: float | None
    duration_s: float
    results: list[RequestResult]
    slo: SLO | None = None
    arrival: str | None = None
    burstiness: float | None = None

    def goodput(self, slo: SLO | None = None) -> dict[str, Any]:
        """Goodput against `slo` (default: the run's own); see the package docstring.

        Keys: `good_requests`, `slo_requests` (the attainment's denominator: the requests that ended ok
        or with an error; dropped clients and requests cut by the run's end are left out), `goodput_req_per_s`,
        `goodput_tok_per_s` (output tokens of good requests / duration), `slo_attainment` (good /
        slo_requests, in [0, 1]; 0 when no request ended) and `slo_met` (attainment >= `slo.attainment`).
        """
        slo = slo or self.slo
        if slo is None:
            raise ValueError("no SLO: pass one, or run with slo=SLO(...)")
        ended = [r for r in self.results if r.status in ("ok", "error")]
        good = [r for r in ended if slo.good(r)]
        dur = self.duration_s if self.duration_s > 0 else math.nan
        attainment = len(good) / len(ended) if ended else 0.0
        return {
            "slo": str(slo),
            "good_requests": len(good),
            "slo_requests": len(ended),
            "goodput_req_per_s": len(good) / dur,
            "goodput_tok_per_s": sum(r.output_tokens for r in good) / dur,
            "slo_attainment": attainment,
            "slo_met": bool(ended) and attainment >= slo.attainment,
        }

    def summary(self) -> dict[str, Any]:
        """Aggregates (latencies in ms); with an SLO, also the `goodput()` keys. See the package docstring."""
        ok = [r for r in self.results if r.status == "ok"]
        err = [r for r in self.results if r.status == "error"]
        dur = self.duration_s if self.duration_s > 0 else math.nan
        out_tok = sum(r.output_tokens for r in ok)
        s: dict[str, Any] = {
            "label": self.label,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "arrival": self.arrival,
            "requests": len(self.results),
            "completed": len(ok),
            "errors": len(err),
            "incomplete": sum(r.status == "incomplete" for r in self.results),
            "dropped": sum(r.status == "dropped" for r in self.results),
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
            ms = _ms(values)
            s[f"{name}_ms_mean"] = sum(ms) / len(ms) if ms else math.nan
            for q in (50, 90, 99):
                s[f"{name}_ms_p{q}"] = percentile(ms, q)
        short = [r for r in ok if r.short]
        long_ = [r for r in ok if not r.short]
        s["short_requests"], s["long_requests"] = len(short), len(long_)
        for name, group in (("short", short), ("long", long_)):
            ms = _ms([r.e2e_s for r in group])
            s[f"{name}_e2e_ms_p50"], s[f"{name}_e2e_ms_p99"] = percentile(ms, 50), percentile(ms, 99)
        if self.slo is not None:
            s.update(self.goodput())
        s["error_example"] = next((f"{r.error_kind}: {r.error}" for r in err), "")
        return s

    def windows(self, window_s: float = 60.0) -> list[dict[str, Any]]:
        """Figures per `window_s` of the run (a soak's per-minute table); see the package docstring.

        A request belongs to the window in which it ended. `streamed_tok_per_s` counts every token
        streamed in the window, so the server's decode rate is not understated where long requests
        are still running (the last window of a soak): a completed request's usage spread evenly over
        its chunks; a dropped or cut one at the completed requests' mean tokens per chunk.
        """
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        # A remainder under half a window (the cut-off overshoots a little) joins the last window.
        n = max(1, round(self.duration_s / window_s))
        ok_chunks = sum(len(r.chunk_times_s) for r in self.results if r.status == "ok")
        mean_per_chunk = sum(r.output_tokens for r in self.results if r.status == "ok") / ok_chunks if ok_chunks else 1.0
        tokens = [0.0] * n
        ended: list[list[RequestResult]] = [[] for _ in range(n)]
        for r in self.results:
            if r.chunk_times_s and r.status in ("ok", "dropped", "incomplete"):
                per_chunk = r.output_tokens / len(r.chunk_times_s) if r.status == "ok" else mean_per_chunk
                for t in r.chunk_times_s:
                    tokens[min(n - 1, int((r.start_s + t) // window_s))] += per_chunk
            if not math.isnan(r.end_s):
                ended[min(n - 1, int(r.end_s // window_s))].append(r)
        rows = []
        for i in range(n):
            length = window_s if i < n - 1 else self.duration_s - i * window_s
            ok = [r for r in ended[i] if r.status == "ok"]
            rows.append({
                "window": i + 1,
                "start_s": i * window_s,
                "completed": len(ok),
                "errors": sum(r.status == "error" for r in ended[i]),
                "dropped": sum(r.status == "dropped" for r in ended[i]),
                "streamed_tok_per_s": tokens[i] / length if length > 0 else math.nan,
                "tpot_ms_p50": percentile(_ms([r.tpot_s for r in ok]), 50),
                "ttft_ms_p50": percentile(_ms([r.ttft_s for r in ok]), 50),
                "short_e2e_ms_p50": percentile(_ms([r.e2e_s for r in ok if r.short]), 50),
            })
        return rows

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        df = pd.DataFrame([r.row() for r in self.results])
        df.insert(0, "label", self.label)
        df.insert(1, "concurrency", self.concurrency)
        df.insert(2, "rate", self.rate)
        if self.slo is not None and len(df):
            df["good"] = [self.slo.good(r) for r in self.results]
        return df

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "url": self.url,
            "model": self.model,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "arrival": self.arrival,
            "burstiness": self.burstiness,
            "slo": asdict(self.slo) if self.slo is not None else None,
            "workload": asdict(self.workload),
            "summary": self.summary(),
            "requests": [asdict(r) for r in self.results],
        }


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
