"""A steady load with faults or updates fired into it (`run_load`, on `llmserve_nb.bench.run_observed`),
and what clients saw: `failure_summary` (sent, accepted, succeeded, failed by kind, hung), `per_second`
and `plot_timeline`."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from llmserve_nb.bench import Action, BenchRun, Timeline, run_benchmark, run_observed
from llmserve_nb.experiments.reliability.faults import running_ids

if TYPE_CHECKING:
    from llmserve_nb.bench import Workload
    from llmserve_nb.cluster import Cluster

__all__ = ["failure_summary", "per_second", "plot_timeline", "run_load"]


def run_load(
    base_url: str,
    workload: Workload,
    *,
    concurrency: int,
    actions: Sequence[Action] = (),
    cluster: Cluster | None = None,
    app_name: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    sample_every_s: float = 0.5,
) -> Timeline[BenchRun]:
    """Run `workload` closed-loop with `concurrency` users for `workload.duration_s` and, meanwhile, each
    action at its offset (on its own thread; actions that outlast the load are waited for). With
    `cluster` and `app_name`, the running replicas' ids (sorted) are sampled as "replicas".

    The timeline is on the run's own clock: seconds since its first request, so that request times,
    samples and events compare (an action at `at_s` shows at about `at_s` minus the client's set-up)."""
    timeline: Timeline[BenchRun] = Timeline()
    returned_at: list[float] = []

    def load() -> BenchRun:
        run = run_benchmark(base_url, workload, concurrency=concurrency, model=model, label="load", progress=False,
                            api_key=api_key)
        returned_at.append(timeline.now())
        return run

    samplers = {}
    if cluster is not None and app_name is not None:
        samplers["replicas"] = lambda: sorted(running_ids(cluster, app_name))
    run_observed(load, samplers, actions, every_s=sample_every_s, timeline=timeline)
    # The run's clock starts when its client is ready (its first send), a moment after the timeline's (up
    # to a second on a loaded machine); it ends `duration_s` later, just before run_benchmark returns.
    return timeline.shifted(max(0.0, returned_at[0] - timeline.result.duration_s))  # type: ignore[union-attr]


def per_second(tl: Timeline[BenchRun]) -> list[dict[str, Any]]:
    """Per second of the load: completed requests, failed requests (by the time they ended) and the
    running replicas (the last sample in that second)."""
    run = tl.result
    n = max(1, math.ceil(run.duration_s))
    rows: list[dict[str, Any]] = [{"t": i, "ok": 0, "errors": 0, "replicas": None} for i in range(n)]
    for r in run.results:
        if math.isnan(r.end_s) or r.status not in ("ok", "error"):
            continue
        row = rows[min(n - 1, int(r.end_s))]
        row["ok" if r.status == "ok" else "errors"] += 1
    samples = sorted(tl.series("replicas"), key=lambda s: s[0])
    last, j = None, 0
    for row in rows:
        while j < len(samples) and samples[j][0] < row["t"] + 1:
            last = len(samples[j][1])
            j += 1
        row["replicas"] = last
    return rows


def _is_backpressure(status: int | None, text: str) -> bool:
    """A refusal by Serve's admission control (max_queued_requests), not a failure of the request."""
    return status == 429 or (status == 503 and "backpressure" in text.lower())


def failure_summary(tl: Timeline[BenchRun], kill_event: str | None = None) -> dict[str, Any]:
    """What the clients saw: sent, accepted (not refused for backpressure), succeeded, failed by kind
    (HTTP status or transport error, with an example message each), hung (ended by the client's own
    timeout: must be 0), and requests cut when the load ended (in flight, not hung). With `kill_event`,
    the kill (its event's value), when it fired and the failures after it."""
    run = tl.result
    res = run.results
    timeout_s = run.workload.timeout_s
    failed: dict[str, int] = {}
    examples: dict[str, str] = {}
    hung = 0
    for r in res:
        if r.status != "error":
            continue
        if r.error_kind == "timeout":
            hung += 1
            continue
        key = f"http_{r.http_status}" if r.error_kind in ("http_4xx", "http_5xx") and r.http_status else r.error_kind
        failed[key] = failed.get(key, 0) + 1
        examples.setdefault(key, (r.error or "")[:240])
    cut = [r for r in res if r.status == "incomplete"]
    # A request cut at the end had run less than the duration's remainder; one older than its timeout
    # would have been a hang the cut hid.
    hung += sum(1 for r in cut if run.duration_s - r.start_s > timeout_s)
    refused = sum(1 for r in res if r.status == "error" and _is_backpressure(r.http_status, r.error or ""))
    out: dict[str, Any] = {
        "sent": len(res),
        "accepted": len(res) - refused,
        "refused_backpressure": refused,
        "succeeded": sum(r.status == "ok" for r in res),
        "failed": sum(failed.values()),
        "failed_by_kind": failed,
        "failure_examples": examples,
        "hung": hung,
        "cut_at_end": len(cut),
        "client_timeout_s": timeout_s,
        "duration_s": round(run.duration_s, 2),
    }
    ev = tl.event(kill_event) if kill_event else None
    if ev is not None:
        kill = ev.value or {}
        out["kill"] = {k: kill.get(k) for k in ("replica_id", "pid", "how")} if isinstance(kill, dict) else kill
        out["kill_at_s"] = round(ev.t_s, 2)
        if ev.error is not None:
            out["kill_error"] = f"{type(ev.error).__name__}: {ev.error}"
        after = [r for r in res if r.status == "error" and r.end_s >= ev.t_s]
        out["failed_after_kill"] = len(after)
        out["last_failure_s_after_kill"] = round(max((r.end_s - ev.t_s for r in after), default=0.0), 2)
    return out


def plot_timeline(tl: Timeline[BenchRun], title: str = "replica kill under load", ax=None):
    """Completed and failed requests per second, running replicas, and the events (kills, recovery)."""
    import matplotlib.pyplot as plt

    rows = per_second(tl)
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    t = [r["t"] + 0.5 for r in rows]
    ax.bar(t, [r["ok"] for r in rows], width=0.9, color="tab:green", label="completed / s")
    ax.bar(t, [r["errors"] for r in rows], width=0.9, bottom=[r["ok"] for r in rows], color="tab:red",
           label="failed / s")
    ax.set_xlabel("seconds into the load")
    ax.set_ylabel("requests per second")
    ax2 = ax.twinx()
    running = [(t_s, len(ids)) for t_s, ids in tl.series("replicas")]
    ax2.step([s[0] for s in running], [s[1] for s in running], where="post", color="tab:blue",
             label="running replicas")
    ax2.set_ylabel("running replicas")
    ax2.set_ylim(0, max([s[1] for s in running] + [1]) + 1)
    for ev in tl.events:
        ax.axvline(ev.t_s, color="black", ls="--", lw=1)
        ax.text(ev.t_s, ax.get_ylim()[1] * 0.95, f" {ev.name}", fontsize=8, va="top")
        rec = ev.value.get("recovery_s") if isinstance(ev.value, dict) else None
        if rec is not None and math.isfinite(rec):
            ax.axvline(ev.t_s + rec, color="tab:blue", ls=":", lw=1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    ax.set_title(title)
    return ax
