"""The plan checked on the cluster at hand: deploy its config (autoscaling from min_replicas), drive the target
rate open loop under `run_observed`, and see what the autoscaler did (running and target replicas, sampled
every second) and what users got once the planned replicas ran.

One continuous Poisson run of `warmup_s + duration_s`. The autoscaler starts from the plan's floor, so
the first seconds are a scale-up: Serve notices the load and a new replica loads its model, meanwhile
the running replicas carry more than their share. The SLO is judged on the requests sent from the moment
the planned count runs (at the latest from `warmup_s` on, if it never does); the whole run's share is
reported beside it, so the cost of the scale-up stays visible.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from llmserve_nb.backends import backend_for
from llmserve_nb.bench import BenchRun, Timeline, Workload, run_benchmark, run_observed
from llmserve_nb.experiments.capacity_plan.plan import CapacityPlan
from llmserve_nb.experiments.capacity_plan.search import Probe, drain_s

if TYPE_CHECKING:
    from llmserve_nb.bench.slo import SLO
    from llmserve_nb.cluster import Cluster

__all__ = ["Verification", "verify_plan"]

LOAD_STARTED = "load started"


@dataclass
class Verification:
    """`summary`: the judged window's requests, good ones, attainment and SLO verdict, the whole run's
    attainment, replicas planned / reached / held; `timeline`: rows of t_s, running, target (Serve's
    decision), seconds from the load's start; `run`: the load's `BenchRun`."""

    summary: dict[str, Any]
    timeline: list[dict[str, Any]]
    run: BenchRun

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "timeline": self.timeline}


def _cluster_cpus(cluster: Cluster) -> float:
    return sum(n["CPU"] for n in cluster.nodes() if n["state"] == "ALIVE")


def verify_plan(cluster: Cluster, plan: CapacityPlan, workload: Workload, slo: SLO, *, duration_s: float = 30.0,
                warmup_s: float = 20.0, every_s: float = 1.0, arrival: str = "poisson", burstiness: float = 1.0,
                require_fit: bool = True, min_requests: int = 20,
                progress: Callable[[str], None] | None = None) -> Verification:
    """Deploy `plan.config` on `cluster` (in place over the search's app: same name, same replica build)
    and send `plan.target_rate` req/s for `warmup_s + duration_s` (then the drain), sampling the model
    deployment's replicas. With `require_fit`, refuses a plan whose replicas do not fit the CPUs of the
    cluster's alive nodes (it could not be verified there); pass False where Ray's cluster autoscaler adds
    nodes on demand. At a low rate `duration_s` is stretched so that the judged window expects at least
    `min_requests` requests: an attainment judged on a handful of requests would say little."""
    have = _cluster_cpus(cluster)
    if require_fit and plan.cpus > have + 1e-9:
        raise ValueError(f"the plan needs {plan.max_replicas} replicas x {plan.config.deployment.num_cpus:g} CPU = "
                         f"{plan.cpus:g} CPUs, this cluster has {have:g}: verify a lower target_rate here, or on a "
                         "larger cluster")
    if duration_s <= 0 or warmup_s < 0:
        raise ValueError(f"need duration_s > 0 and warmup_s >= 0, got {duration_s} and {warmup_s}")
    app = cluster.deploy(plan.config, progress=progress)
    deployment = backend_for(plan.config).model_deployment(plan.config)
    seconds = warmup_s + max(duration_s, min_requests / plan.target_rate)
    wl = dataclasses.replace(workload, num_requests=max(1, math.ceil(plan.target_rate * seconds)),
                             duration_s=seconds + drain_s(slo, workload))

    def replicas() -> tuple[int, int | None]:
        d = app.status().deployment(deployment)
        return len(d.running), d.target_replicas

    timeline: Timeline[BenchRun] = Timeline()

    def load() -> BenchRun:
        timeline.mark(LOAD_STARTED)  # the run's clock starts here: its requests' start_s count from it
        return run_benchmark(app.base_url, wl, rate=plan.target_rate, slo=slo, arrival=arrival, burstiness=burstiness,
                             model=app.model, label="verify", progress=False, api_key=app.api_key)

    run_observed(load, {"replicas": replicas}, every_s=every_s, timeline=timeline)
    run: BenchRun = timeline.result  # type: ignore[assignment]
    timeline = timeline.shifted(timeline.event(LOAD_STARTED).t_s)  # type: ignore[union-attr]
    rows = [{"t_s": t, "running": running, "target": target} for t, (running, target) in timeline.series("replicas")]
    reached_at = timeline.first("replicas", lambda v: v[0] >= plan.replicas)
    start = min(reached_at, warmup_s) if reached_at is not None else warmup_s
    judged = Probe.from_run(run, slo, sent=(start, seconds))
    whole = Probe.from_run(run, slo, sent=(0.0, seconds))
    during = [r["running"] for r in rows if start <= r["t_s"] <= seconds]
    summary = {
        "rate": plan.target_rate, "duration_s": seconds, "window_start_s": round(start, 1),
        "requests": judged.requests, "good": judged.good, "attainment": round(judged.attainment, 4),
        "slo_met": judged.met, "errors": judged.errors, "e2e_mean_s": round(judged.e2e_mean_s, 3),
        "e2e_p99_s": round(judged.e2e_p99_s, 3), "ttft_p99_s": round(judged.ttft_p99_s, 3),
        "whole_run_requests": whole.requests, "whole_run_attainment": round(whole.attainment, 4),
        "replicas_planned": plan.replicas, "replicas_reached": max((r["running"] for r in rows), default=0),
        "reached_planned_at_s": reached_at, "replicas_min_in_window": min(during, default=0),
        "replicas_target_max": max((r["target"] or 0 for r in rows), default=0),
        "sample_errors": len(timeline.sample_errors.get("replicas", [])),
    }
    return Verification(summary, rows, run)
