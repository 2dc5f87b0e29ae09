"""Faults injected into a live app, and its recovery: kill one replica's process (`kill_replica`), make one
replica's engine loop die (`kill_engine_loop`), wait until Serve replaced it (`wait_replaced`) and a
request is served by the replacement (`wait_served_by`); `kill_and_recover` does all of it as one
action for `run_load`.

Killing needs a Ray driver connected to the cluster: `connect()` (embedded local Ray) is one; on a
remote cluster run this from a pod with `ray.init(address=...)`. Replicas are found through Serve's
status (`Cluster.app_status`), which gives each replica's actor name, PID and node.
`kill_replica(how="ray_kill")` calls `ray.kill` on the replica actor; `how="sigkill"` sends SIGKILL to
its PID (directly when the replica runs on this machine, else from a zero-CPU Ray task pinned to the
replica's node); `how="engine_core"` sends it to the replica's engine-core process, found through the
actor's `__ray_call__`, as `kill_engine_loop` reaches the replica.
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import httpx

from llmserve_nb.bench.client import headers
from llmserve_nb.cluster.status import Replica
from llmserve_nb.config import DEPLOYMENT_NAME

if TYPE_CHECKING:
    from llmserve_nb.cluster import AppHandle, Cluster

__all__ = ["INJECTED_FAULT", "kill_and_recover", "kill_engine_loop", "kill_replica", "replicas", "running_ids",
           "wait_replaced", "wait_served_by"]

INJECTED_FAULT = "engine loop killed by llmserve_nb.experiments.reliability.kill_engine_loop (fault injection)"


def replicas(cluster: Cluster, app_name: str, deployment: str = DEPLOYMENT_NAME) -> list[Replica]:
    """The deployment's replicas as Serve reports them (replica_id, state, pid, actor_name, node_id, ...)."""
    app = cluster.app_status(app_name)
    return list(app.deployment(deployment).replicas) if app is not None else []


def running_ids(cluster: Cluster, app_name: str) -> set[str]:
    return {r.replica_id for r in replicas(cluster, app_name) if r.running}


def _pick(cluster: Cluster, app_name: str, replica_id: str | None) -> Replica:
    running = [r for r in replicas(cluster, app_name) if r.running]
    if replica_id is not None:
        running = [r for r in running if r.replica_id == replica_id]
    if not running:
        raise RuntimeError(f"no RUNNING replica{' ' + replica_id if replica_id else ''} of {app_name!r}")
    return min(running, key=lambda r: r.replica_id)


def _require_ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("killing a replica needs a Ray driver connected to the cluster: connect() (embedded "
                           "local Ray) is one; for a remote cluster call ray.init(address=...) first")
    return ray


def _serve_actor(ray: Any, replica: Replica) -> Any:
    return ray.get_actor(replica.actor_name, namespace="serve")


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _engine_core_pid(_actor: Any) -> dict[str, Any]:
    """Runs inside a replica process (through `__ray_call__`): its engine's core process, if it has one."""
    from ray import serve

    context = serve.get_replica_context()
    info = context.servable_object.engine.info()
    return {"replica_id": context.replica_id.unique_id, "core_pid": info.get("engine_core_pid")}


def kill_replica(cluster: Cluster, app_name: str, how: str = "ray_kill", replica_id: str | None = None,
                 ) -> dict[str, Any]:
    """Kill one RUNNING replica's process: `how="ray_kill"` (ray.kill on its actor, no restart: Serve's
    controller must notice and replace it) or `"sigkill"` (SIGKILL to its PID); or `"engine_core"`: SIGKILL
    to its engine-core process (`EngineConfig(engine_core="process")`), the replica's own process staying
    up, so that only its health check can get it replaced. Returns which replica, the PID killed and the
    time of the kill (time.time())."""
    ray = _require_ray()
    r = _pick(cluster, app_name, replica_id)
    if how == "ray_kill":
        t = time.time()
        ray.kill(_serve_actor(ray, r), no_restart=True)
        return {"replica_id": r.replica_id, "pid": r.pid, "how": how, "killed_at": t}
    if how == "sigkill":
        if not r.pid:
            raise RuntimeError(f"Serve reports no pid for replica {r.replica_id}")
        pid = int(r.pid)
    elif how == "engine_core":
        core = ray.get(_serve_actor(ray, r).__ray_call__.remote(_engine_core_pid), timeout=120)
        if not core["core_pid"]:
            raise RuntimeError(f"replica {r.replica_id}'s engine has no core process (engine.engine_core is "
                               "'thread'): nothing to kill but the replica")
        pid = int(core["core_pid"])
    else:
        raise ValueError(f"how={how!r}: use 'ray_kill', 'sigkill' or 'engine_core'")
    t = time.time()
    if r.node_id in ("", ray.get_runtime_context().get_node_id()):
        _sigkill(pid)
    else:  # another node: a zero-CPU task pinned there sends the signal
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0)(_sigkill).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(r.node_id, soft=False))
        ray.get(task.remote(pid), timeout=60)
    return {"replica_id": r.replica_id, "pid": pid, "how": how, "killed_at": t}


def _poison_engine(_actor: Any) -> dict[str, Any]:
    """Runs inside a replica process (through `__ray_call__`): the replica's engine loop dies through its
    fault-injection hook (`LLMServer.inject_engine_fault` → `Engine.inject_fault`), as a bug inside the
    loop would. The deployment's instance is Serve's public `ReplicaContext.servable_object`."""
    from ray import serve

    context = serve.get_replica_context()
    context.servable_object.inject_engine_fault(INJECTED_FAULT)
    return {"replica_id": context.replica_id.unique_id, "pid": os.getpid()}


def kill_engine_loop(cluster: Cluster, app_name: str, replica_id: str | None = None) -> dict[str, Any]:
    """Make one replica's engine decode loop die; the replica process stays up, so only Serve's health
    check (`LLMServer.check_health`) can get it replaced."""
    ray = _require_ray()
    r = _pick(cluster, app_name, replica_id)
    t = time.time()
    hit = ray.get(_serve_actor(ray, r).__ray_call__.remote(_poison_engine), timeout=120)
    if hit["replica_id"] != r.replica_id:
        raise RuntimeError(f"injected the fault into replica {hit['replica_id']} (pid {hit['pid']}), not the "
                           f"chosen {r.replica_id} (pid {r.pid})")
    return {"replica_id": r.replica_id, "pid": r.pid, "how": "engine_loop", "killed_at": t}


def wait_replaced(cluster: Cluster, app_name: str, gone: str, target: int, timeout_s: float = 300.0,
                  since: float | None = None) -> dict[str, Any]:
    """Wait until replica `gone` is no longer RUNNING and `target` replicas run again (one of them new).
    Returns the new replica ids and `recovery_s`, counted from `since` (the kill's time.time())."""
    since = since if since is not None else time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        ids = running_ids(cluster, app_name)
        if gone not in ids and len(ids) >= target:
            return {"replicas": sorted(ids), "recovery_s": time.time() - since}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app_name}: replica {gone} not replaced within {timeout_s:g} s "
                               f"(running: {sorted(ids)})")
        time.sleep(0.25)


def wait_served_by(base_url: str, replica_ids: set[str], *, api_key: str | None = None, timeout_s: float = 120.0,
                   since: float | None = None) -> float:
    """Seconds from `since` until a `/stats` answer comes from one of `replica_ids` (a request served by
    the replacement); NaN if none did within `timeout_s`."""
    since = since if since is not None else time.time()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, connect=5.0), headers=headers(api_key)) as c:
        while time.monotonic() < deadline:
            try:
                r = c.get(base_url.rstrip("/") + "/stats")
                if r.status_code == 200 and r.json().get("replica") in replica_ids:
                    return time.time() - since
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
    return math.nan


def kill_and_recover(cluster: Cluster, app: AppHandle, how: str, target: int, timeout_s: float = 300.0,
                     replica_id: str | None = None) -> dict[str, Any]:
    """An action for `run_load` (`Action(at_s, "kill", lambda: kill_and_recover(...))`): kill one replica
    (`how`: ray_kill, sigkill, engine_core or engine_loop), then wait until Serve runs `target` replicas again and a
    request is served by the replacement. Returns the kill record with `recovery_s` (kill → replacement
    RUNNING) and `serving_s` (kill → first answer from the replacement)."""
    before = running_ids(cluster, app.name)
    if how == "engine_loop":
        k = kill_engine_loop(cluster, app.name, replica_id)
    else:
        k = kill_replica(cluster, app.name, how, replica_id)
    try:
        rep = wait_replaced(cluster, app.name, k["replica_id"], target, timeout_s, since=k["killed_at"])
    except TimeoutError as e:
        return {**k, "recovery_s": math.nan, "serving_s": math.nan, "error": str(e)}
    new = set(rep["replicas"]) - before
    serving = wait_served_by(app.base_url, new, api_key=app.api_key, timeout_s=60.0, since=k["killed_at"])
    return {**k, "recovery_s": rep["recovery_s"], "serving_s": serving, "replicas_after": rep["replicas"]}
