"""Matplotlib figures of a sweep: throughput against latency, latency CDFs, TTFT against concurrency."""
from __future__ import annotations

import math
from typing import Literal

from llmserve_nb.bench.results import BenchReport


def _summary_of(x):
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


def plot_goodput(report, ax=None):
    """Goodput req/s (solid, left axis) and SLO attainment (dashed, right axis) against rate or concurrency.

    One colour per label; the dotted line on the right axis is the SLO's target attainment. Needs runs
    with an SLO (`slo=` in `sweep`, `compare_configs` or `run_benchmark`).
    """
    import matplotlib.pyplot as plt

    df = _summary_of(report)
    if "goodput_req_per_s" not in df.columns:
        raise ValueError("no goodput in these runs: run them with slo=SLO(...)")
    df = df[df["goodput_req_per_s"].notna()]
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    right = ax.twinx()
    level = "rate" if df["concurrency"].isna().all() else "concurrency"
    for label, g in df.groupby("label", sort=False):
        g = g.sort_values(level)
        (line,) = ax.plot(g[level], g["goodput_req_per_s"], marker="o", label=f"{label} goodput")
        right.plot(g[level], g["slo_attainment"], ls="--", marker=".", color=line.get_color(),
                   label=f"{label} attainment")
    if isinstance(report, BenchReport):
        for target in sorted({run.slo.attainment for run in report.runs if run.slo is not None}):
            right.axhline(target, ls=":", color="grey", label=f"target {target:.0%}")
    ax.set_xlabel("offered rate (req/s)" if level == "rate" else "concurrency")
    ax.set_ylabel("goodput (req/s)")
    right.set_ylabel("SLO attainment")
    right.set_ylim(0, 1.05)
    ax.set_title(f"goodput vs {level}")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = right.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8)
    return ax
