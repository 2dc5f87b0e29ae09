"""Tables: markdown without `tabulate`, ratios between labels, config comparisons, soak windows."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from llmserve_nb.bench.arrivals import Arrival
from llmserve_nb.bench.results import BenchReport, BenchRun
from llmserve_nb.bench.runner import sweep
from llmserve_nb.bench.slo import SLO
from llmserve_nb.bench.workload import Workload

if TYPE_CHECKING:
    import pandas as pd

SUMMARY_COLUMNS = (
    "label", "concurrency", "rate", "completed", "errors", "incomplete", "dropped", "req_per_s", "output_tok_per_s",
    "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p50", "e2e_ms_p50", "e2e_ms_p99",
    "short_requests", "short_e2e_ms_p50", "short_e2e_ms_p99",
)
# The summary's columns for runs with an SLO (absent from runs without one).
GOODPUT_COLUMNS = ("good_requests", "goodput_req_per_s", "goodput_tok_per_s", "slo_attainment", "slo_met")
_RATIO_METRICS = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50", "e2e_ms_p50")
_GOODPUT_RATIO_METRICS = ("goodput_req_per_s", "goodput_tok_per_s")


def summary_columns(summary: pd.DataFrame) -> list[str]:
    """`SUMMARY_COLUMNS`, plus the goodput ones where the runs had an SLO."""
    return list(SUMMARY_COLUMNS) + [c for c in GOODPUT_COLUMNS if c in summary.columns]


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


def ratio_table(summary: pd.DataFrame, baseline: str | None = None,
                metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Each row's metrics divided by the baseline label's at the same concurrency/rate.

    Adds `<metric>_ratio` columns (baseline = the first label when not given); by default for tok/s,
    TTFT, TPOT and e2e p50, and goodput req/s and tok/s where the runs had an SLO. A throughput or
    goodput ratio above 1 and latency ratios below 1 mean better than the baseline. A level the
    baseline did not run gets NaN, and so does a goodput ratio to a baseline goodput of 0.
    """
    if metrics is None:
        metrics = _RATIO_METRICS + tuple(m for m in _GOODPUT_RATIO_METRICS if m in summary.columns)
    df = summary.copy()
    baseline = baseline if baseline is not None else df["label"].iloc[0]
    level = "concurrency" if df["concurrency"].notna().any() else "rate"
    base = df[df["label"] == baseline].set_index(level)
    for m in metrics:
        ref = df[level].map(base[m]).astype(float)
        df[f"{m}_ratio"] = df[m] / ref.where(ref != 0)
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
    slo: SLO | None = None,
    rates: Iterable[float] | None = None,
    arrival: Arrival = "poisson",
    burstiness: float = 1.0,
) -> pd.DataFrame:
    """Deploy each config in turn on `cluster` and run the same sweep; ratios to the first.

    The sweep is over `concurrency` levels, or open loop over `rates` (req/s, with `arrival` and
    `burstiness`) when those are given. With an `slo` every run reports goodput, and the table has
    goodput ratio columns.

    `configs` holds `AppConfig`s or `(label, AppConfig)` pairs; unlabelled ones are named after the
    fields where they differ from the first. Consecutive configs of the same app name are deployed over
    each other, so Serve changes what it can in place (batching, replica counts, `max_ongoing_requests`:
    seconds, no model reload) and restarts replicas only for what builds them (the engine); an app is
    shut down when the next config has another name, and the last one at the end, also on failure.
    An app already running under the first config's name is reused the same way. Returns `ratio_table` of
    the combined summary, baseline = the first config; with `out_dir`, each config's files land in
    `out_dir/<n>-<label>/`.
    """
    wl = workload or Workload()
    levels = list(concurrency)
    rate_levels = list(rates) if rates is not None else None
    pairs = [c if isinstance(c, tuple) else (None, c) for c in configs]
    if not pairs:
        raise ValueError("compare_configs needs at least one config")
    first = pairs[0][1]
    report = BenchReport()
    app = None
    try:
        for n, (label, cfg) in enumerate(pairs):
            label = label or _config_label(cfg, first)
            if app is not None and app.name != cfg.name:
                app.shutdown()
            app = cluster.deploy(cfg)
            part = sweep(app.base_url, wl, concurrency=levels, rates=rate_levels, model=app.model, label=label,
                         progress=progress, api_key=getattr(app, "api_key", None), slo=slo, arrival=arrival,
                         burstiness=burstiness)
            if out_dir is not None:
                safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:60]
                part.save(Path(out_dir) / f"{n}-{safe}")
            report = report + part
    finally:
        if app is not None:
            app.shutdown()
    return ratio_table(report.summary())


def soak_table(run: BenchRun, window_s: float = 60.0) -> pd.DataFrame:
    """`run.windows(window_s)` as a frame, with each window's TPOT p50 divided by the first window's.

    The last row's `tpot_vs_first` is the soak's drift figure: at most 1.1 means decode speed held.
    """
    import pandas as pd

    df = pd.DataFrame(run.windows(window_s))
    first = df["tpot_ms_p50"].iloc[0]
    df["tpot_vs_first"] = df["tpot_ms_p50"] / first if first and not math.isnan(first) else math.nan
    return df
