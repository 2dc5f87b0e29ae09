"""Nodes follow replicas: `scale_out_and_back` scales an app on a `LocalAutoscalingCluster` past what its
nodes hold and back, under `llmserve_nb.bench.run_observed` (nodes and replicas sampled every
`interval_s`), and measures how the cluster autoscaler followed; `plot_timeline` draws it."""
from __future__ import annotations

from typing import Any, Callable

from llmserve_nb.bench import Timeline, run_observed
from llmserve_nb.cluster import Cluster, ClusterError
from llmserve_nb.cluster.status import AppStatus
from llmserve_nb.backends import backend_for
from llmserve_nb.config import AppConfig
from llmserve_nb.experiments.cluster_autoscaling.local import LocalAutoscalingCluster

__all__ = ["cluster_sampler", "plot_timeline", "scale_out_and_back"]


def cluster_sampler(lac: LocalAutoscalingCluster, cluster: Cluster, config: AppConfig) -> Callable[[], dict[str, int]]:
    """For `run_observed`: alive nodes, the running and target replicas of the deployment of `config`'s app
    that holds the model, and how many of those run on worker (autoscaled) nodes."""
    app_name, deployment = config.name, backend_for(config).model_deployment(config)
    def sample() -> dict[str, int]:
        nodes = lac.nodes()
        head_ids = {n["node_id"] for n in nodes if n["head"]}
        # An app Serve does not know (yet, or any more) has no replicas.
        dep = (cluster.app_status(app_name) or AppStatus(app_name)).deployment(deployment)
        running = dep.running
        return {
            "nodes": len(nodes),
            "worker_nodes": len(nodes) - len(head_ids),
            "running_replicas": len(running),
            "target_replicas": dep.target_replicas or 0,
            "replicas_on_workers": sum(r.node_id not in head_ids for r in running),
        }

    return sample


def scale_out_and_back(
    lac: LocalAutoscalingCluster,
    config: AppConfig | None = None,
    *,
    replicas: int = 2,
    interval_s: float = 1.0,
    timeout_s: float = 180.0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Deploy one replica, ask for `replicas` (more than the nodes hold), then go back to one.

    Measures, from the scale-up request: a worker node joining, and all replicas RUNNING with one
    more of them on worker nodes; from the scale-down request: the replica stopped and the idle node
    removed. `config` defaults to the embedded model; each replica asks for one worker's CPUs, so one
    extra replica needs one extra node. Returns {"summary": {...}, "timeline": rows, "events": [...]}.
    The app is deleted at the end; the cluster keeps running.
    """
    if replicas < 2:
        raise ValueError("replicas must be >= 2: one more than the deployment starts with")
    config = (config or AppConfig()).with_overrides(**{"deployment.num_cpus": lac.worker_cpus,
                                                       "deployment.autoscaling": None})
    say = progress or (lambda _: None)
    cluster = lac.connect()
    timeline: Timeline[dict[str, Any]] = Timeline()

    def wait(pred: Callable[[dict[str, int]], bool], since_s: float, within_s: float,
             what: str) -> tuple[float, dict[str, int]]:
        """The first sample at or after `since_s` where `pred` holds (it may already have been taken)."""
        try:
            return timeline.wait_for("cluster", pred, since_s=since_s, timeout_s=within_s)
        except TimeoutError as e:
            raise ClusterError(f"not within {within_s:.0f}s: {what} ({e})\n{lac.log_tails()}") from None

    def scenario() -> dict[str, Any]:
        timeline.mark("deploy 1 replica")
        handle = cluster.deploy(config.with_overrides(**{"deployment.num_replicas": 1}), timeout_s=timeout_s,
                                progress=None)
        _, base = wait(lambda r: r["running_replicas"] == 1, timeline.now(), timeout_s, "1 replica RUNNING")
        say(f"[{timeline.now():6.1f}s] 1 replica RUNNING; nodes: {base['nodes']}")

        up = timeline.mark(f"scale to {replicas} replicas").t_s
        handle.update(config.with_overrides(**{"deployment.num_replicas": replicas}), timeout_s=timeout_s)
        node_added, _ = wait(lambda r: r["worker_nodes"] > base["worker_nodes"], up, timeout_s, "a worker node joined")
        all_running, peak = wait(
            lambda r: r["running_replicas"] >= replicas and r["replicas_on_workers"] > base["replicas_on_workers"],
            up, timeout_s, f"{replicas} replicas RUNNING, one more on worker nodes")
        say(f"[{timeline.now():6.1f}s] {replicas} replicas RUNNING; nodes: {peak['nodes']} "
            f"(a node joined {node_added - up:.1f}s after the request)")

        down = timeline.mark("scale to 1 replica").t_s
        handle.update(config.with_overrides(**{"deployment.num_replicas": 1}), timeout_s=timeout_s)
        replica_gone, _ = wait(lambda r: r["running_replicas"] == 1 and r["target_replicas"] == 1, down, timeout_s,
                               "back to 1 replica")
        node_removed, _ = wait(lambda r: r["worker_nodes"] <= base["worker_nodes"], replica_gone,
                               timeout_s + lac.idle_timeout_s, "the idle worker node removed")
        timeline.mark("idle node removed")
        say(f"[{timeline.now():6.1f}s] worker node removed {node_removed - replica_gone:.1f}s after its replica "
            f"stopped (idle timeout {lac.idle_timeout_s:g}s)")
        return {"base": base, "up": up, "node_added": node_added, "all_running": all_running, "down": down,
                "replica_gone": replica_gone, "node_removed": node_removed}

    run_observed(scenario, {"cluster": cluster_sampler(lac, cluster, config)}, every_s=interval_s,
                 timeline=timeline)
    try:
        cluster.delete(config.name)
    except ClusterError as e:
        say(f"could not delete {config.name!r}: {e}")
    at = timeline.result
    base = at["base"]
    rows = [{"t_s": t, **row} for t, row in timeline.series("cluster")]
    summary = {
        "replicas_requested": replicas,
        "idle_timeout_s": lac.idle_timeout_s,
        "nodes_before": base["nodes"],
        "nodes_peak": max(r["nodes"] for r in rows),
        "nodes_after": rows[-1]["nodes"],
        "replicas_before": base["running_replicas"],
        "replicas_peak": max(r["running_replicas"] for r in rows),
        "replicas_after": rows[-1]["running_replicas"],
        "replicas_on_workers_before": base["replicas_on_workers"],
        "replicas_on_workers_peak": max(r["replicas_on_workers"] for r in rows),
        "s_to_node_added": round(at["node_added"] - at["up"], 1),
        "s_to_replica_running": round(at["all_running"] - at["up"], 1),
        "s_to_replica_stopped": round(at["replica_gone"] - at["down"], 1),
        "s_to_node_removed": round(at["node_removed"] - at["down"], 1),
        "s_node_idle_before_removed": round(at["node_removed"] - at["replica_gone"], 1),
        "samples": len(rows),
        "sample_errors": len(timeline.sample_errors.get("cluster", [])),
    }
    return {"summary": summary, "timeline": rows, "events": [{"t_s": e.t_s, "event": e.name} for e in timeline.events]}


def plot_timeline(result: dict[str, Any], ax=None):
    """Node count beside replica count over time (steps), with the scale requests as vertical lines."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    rows = result["timeline"]
    t = [r["t_s"] for r in rows]
    # Wide and pale underneath, so the replica lines stay visible where the counts are equal.
    ax.step(t, [r["nodes"] for r in rows], where="post", label="alive nodes", color="tab:red", linewidth=4, alpha=0.5)
    ax.step(t, [r["running_replicas"] for r in rows], where="post", label="running replicas", color="tab:blue")
    ax.step(t, [r["target_replicas"] for r in rows], where="post", label="target replicas", color="tab:blue",
            linestyle=":")
    top = max(max(r["nodes"] for r in rows), max(r["target_replicas"] for r in rows)) + 1
    ax.set_ylim(0, top + 0.5)
    ax.set_yticks(range(0, top + 1))
    for ev in result.get("events", []):
        ax.axvline(ev["t_s"], color="grey", linewidth=0.8, linestyle="--")
        ax.annotate(ev["event"], (ev["t_s"], top + 0.4), rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.set_title("Ray cluster autoscaler: nodes follow replicas")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax
