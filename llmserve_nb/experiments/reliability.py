"""Reliability experiments shared by `notebooks/04_reliability.ipynb`, `benchmarks/replica_failure.py`
and `tests/test_reliability.py`: overload bursts, replica kills under load, engine-loop failures,
updates under load, and the figures that say how the app behaved (accepted, succeeded, failed by
kind, hung, recovery time).

Where things run:

- The HTTP probes (`burst`, `probe`) and the load (`run_load`, built on `llmserve_nb.bench`) only
  need the app's URL.
- Killing a replica needs a Ray driver connected to the cluster: `connect()` (embedded local Ray)
  is one; on a remote cluster run this from a pod with `ray.init(address=...)`. Replicas are found
  through Serve's REST details (`Cluster.serve_details`), which give each replica's actor name and
  PID. `kill_replica(how="ray_kill")` calls `ray.kill` on the replica actor; `how="sigkill"` sends
  SIGKILL to its PID (directly when the replica runs on this machine, else from a zero-CPU Ray task
  pinned to the replica's node). `kill_engine_loop` makes the engine's decode loop of one replica
  die (the failure the deployment's `check_health` exists for), through the actor's `__ray_call__`.

Every client call here has a timeout, so an experiment never hangs on a dead app.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import httpx

from llmserve_nb.config import DEPLOYMENT_NAME
from llmserve_nb.stats import percentile
from llmserve_nb.bench.runner import _run_sync

if TYPE_CHECKING:
    from llmserve_nb.bench import BenchRun, Workload
    from llmserve_nb.cluster import AppHandle, Cluster

__all__ = [
    "BACKPRESSURE_STATUSES",
    "LoadTimeline",
    "backpressure_check",
    "burst",
    "failure_summary",
    "fuzz_openapi",
    "kill_and_recover",
    "kill_engine_loop",
    "kill_replica",
    "plot_timeline",
    "probe",
    "replicas",
    "run_load",
    "small_queue_config",
    "wait_replaced",
]

# What Serve answers when a request is refused for backpressure (deployment.backpressure_status_code).
BACKPRESSURE_STATUSES = (503, 429)
INJECTED_FAULT = "engine loop killed by llmserve_nb.experiments.reliability.kill_engine_loop (fault injection)"


# ---- HTTP probes ---------------------------------------------------------------------------------
def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe(base_url: str, path: str = "/v1/completions", body: dict[str, Any] | None = None, *,
          api_key: str | None = None, method: str = "POST", timeout_s: float = 60.0) -> dict[str, Any]:
    """One request: its status, the error message (when the body is an OpenAI error) and Retry-After."""
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(timeout_s, connect=5.0)) as c:
        r = c.request(method, base_url.rstrip("/") + path, json=body, headers=_headers(api_key))
    try:
        message = r.json().get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    return {"status": r.status_code, "message": message or ("" if r.status_code < 400 else r.text[:300]),
            "retry_after": r.headers.get("retry-after")}


async def _burst(base_url: str, n: int, api_key: str | None, max_tokens: int, timeout_s: float,
                 prompt: str) -> list[dict[str, Any]]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key), trust_env=False,
                                 timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> dict[str, Any]:
            await start.wait()
            t0 = time.perf_counter()
            row: dict[str, Any] = {"index": i, "status": None, "retry_after": None, "error": ""}
            try:
                r = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout_s)
                row["status"] = r.status_code
                row["retry_after"] = r.headers.get("retry-after")
                if r.status_code >= 400:
                    row["error"] = r.text[:300]
                else:
                    row["completion_tokens"] = r.json()["usage"]["completion_tokens"]
            except (httpx.TimeoutException, asyncio.TimeoutError):
                row["error"] = f"no answer within {timeout_s:g} s"
            except httpx.HTTPError as e:
                row["error"] = f"{type(e).__name__}: {e}"
            row["latency_s"] = time.perf_counter() - t0
            return row

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # every task is waiting on the event: release them together
        start.set()
        return list(await asyncio.gather(*tasks))


def burst(base_url: str, n: int = 20, *, api_key: str | None = None, max_tokens: int = 32,
          timeout_s: float = 120.0, prompt: str = "Story: the ship sailed") -> dict[str, Any]:
    """`n` completions sent at the same instant. Returns per-request rows and a summary: how many were
    accepted (200), refused for backpressure (503/429, with Retry-After?), failed otherwise or unanswered,
    and the latencies of each group."""
    rows = _run_sync(_burst(base_url, n, api_key, max_tokens, timeout_s, prompt))
    ok = [r for r in rows if r["status"] == 200]
    refused = [r for r in rows if r["status"] in BACKPRESSURE_STATUSES]
    other = [r for r in rows if r not in ok and r not in refused]

    def pct(rs: list[dict], q: float) -> float:
        return percentile([r["latency_s"] for r in rs], q)

    return {
        "requests": n,
        "accepted": len(ok),
        "refused": len(refused),
        "refused_statuses": sorted({r["status"] for r in refused}),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "retry_after": sorted({r["retry_after"] for r in refused if r["retry_after"] is not None}),
        "other_failures": len(other),
        "other_examples": [f"{r['status']}: {r['error'][:200]}" for r in other[:3]],
        "accepted_p50_s": pct(ok, 50),
        "accepted_p99_s": pct(ok, 99),
        "accepted_max_s": max((r["latency_s"] for r in ok), default=math.nan),
        "refused_p99_s": pct(refused, 99),
        "refused_max_s": max((r["latency_s"] for r in refused), default=math.nan),
        "refusal_example": refused[0]["error"][:200] if refused else "",
        "rows": rows,
    }


def backpressure_check(base_url: str, n: int = 20, *, slots: int, api_key: str | None = None,
                       max_tokens: int = 16, settle_s: float = 3.0) -> dict[str, Any]:
    """A burst of `n` against the app, then one wave of what it runs at once (`slots` = replicas x
    max_ongoing_requests, at most what the burst got accepted) alone, as the yardstick: the accepted
    requests of the burst should take no longer than the `waves` they need (the queued ones wait for a
    running one to end) times that wave. Returns {"burst", "alone", "waves", "table"}."""
    import pandas as pd

    over = burst(base_url, n, api_key=api_key, max_tokens=max_tokens)
    # Serve's router caches the replicas' queue lengths for a moment, so right after a burst it may
    # refuse again: let it settle.
    time.sleep(settle_s)
    alone = burst(base_url, max(1, min(over["accepted"], slots)), api_key=api_key, max_tokens=max_tokens)
    columns = ["requests", "accepted", "refused", "refused_statuses", "refused_with_retry_after", "retry_after",
               "refused_max_s", "accepted_p50_s", "accepted_p99_s"]
    table = pd.DataFrame([{**{k: r[k] for k in columns}, "run": name}
                          for name, r in (("burst", over), ("one wave alone", alone))]).set_index("run")
    return {"burst": over, "alone": alone, "waves": math.ceil(over["accepted"] / slots), "table": table}


def small_queue_config(name: str = "reliability", *, api_key: str | None = None, num_cpus: float = 1.0,
                       torch_threads: int | None = None):
    """The app the reliability experiments overload: two replicas that each run 2 requests and queue 2
    more in Serve (a burst of 20 overflows it), answering overload with 503 + Retry-After 3, health
    checked every 2 s, draining for up to 30 s on shutdown. `api_key` is enforced by the replicas."""
    from llmserve_nb.config import AppConfig

    runtime_env = {"env_vars": {"LLMSERVE_NB_API_KEY": api_key}} if api_key else {}
    overrides: dict[str, Any] = {
        "engine.max_num_seqs": 8,
        "batching.max_batch_size": 2,
        "batching.batch_wait_timeout_s": 0.02,
        "deployment.num_replicas": 2,
        "deployment.num_cpus": num_cpus,
        "deployment.max_ongoing_requests": 2,
        "deployment.max_queued_requests": 2,
        "deployment.retry_after_s": 3,
        "deployment.health_check_period_s": 2.0,
        "deployment.health_check_timeout_s": 20.0,
        "deployment.graceful_shutdown_wait_loop_s": 0.5,
        "deployment.graceful_shutdown_timeout_s": 30.0,
    }
    if torch_threads is not None:
        overrides["engine.torch_threads"] = torch_threads
    return AppConfig(name=name, route_prefix=f"/{name}", runtime_env=runtime_env).with_overrides(**overrides)


# ---- replicas --------------------------------------------------------------------------------------
def replicas(cluster: Cluster, app_name: str, deployment: str = DEPLOYMENT_NAME) -> list[dict[str, Any]]:
    """The deployment's replicas as Serve's REST details report them (replica_id, state, pid,
    actor_name, node_id, node_ip, ...)."""
    app = (cluster.serve_details().get("applications") or {}).get(app_name) or {}
    return list(((app.get("deployments") or {}).get(deployment) or {}).get("replicas") or [])


def running_ids(cluster: Cluster, app_name: str) -> set[str]:
    return {r["replica_id"] for r in replicas(cluster, app_name) if r.get("state") == "RUNNING"}


def _pick(cluster: Cluster, app_name: str, replica_id: str | None) -> dict[str, Any]:
    running = [r for r in replicas(cluster, app_name) if r.get("state") == "RUNNING"]
    if replica_id is not None:
        running = [r for r in running if r["replica_id"] == replica_id]
    if not running:
        raise RuntimeError(f"no RUNNING replica{' ' + replica_id if replica_id else ''} of {app_name!r}")
    return sorted(running, key=lambda r: r["replica_id"])[0]


def _require_ray() -> Any:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("killing a replica needs a Ray driver connected to the cluster: connect() (embedded "
                           "local Ray) is one; for a remote cluster call ray.init(address=...) first")
    return ray


def _serve_actor(ray: Any, replica: dict[str, Any]) -> Any:
    return ray.get_actor(replica["actor_name"], namespace="serve")


def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_replica(cluster: Cluster, app_name: str, how: str = "ray_kill", replica_id: str | None = None,
                 ) -> dict[str, Any]:
    """Kill one RUNNING replica's process: `how="ray_kill"` (ray.kill on its actor, no restart: Serve's
    controller must notice and replace it) or `"sigkill"` (SIGKILL to its PID). Returns which replica,
    its PID and the time of the kill (time.time())."""
    ray = _require_ray()
    r = _pick(cluster, app_name, replica_id)
    t = time.time()
    if how == "ray_kill":
        ray.kill(_serve_actor(ray, r), no_restart=True)
    elif how == "sigkill":
        if not r.get("pid"):
            raise RuntimeError(f"Serve reports no pid for replica {r['replica_id']}")
        if r.get("node_id") in (None, ray.get_runtime_context().get_node_id()):
            _sigkill(int(r["pid"]))
        else:  # another node: a zero-CPU task pinned there sends the signal
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            task = ray.remote(num_cpus=0)(_sigkill).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(r["node_id"], soft=False))
            ray.get(task.remote(int(r["pid"])), timeout=60)
    else:
        raise ValueError(f"how={how!r}: use 'ray_kill' or 'sigkill'")
    return {"replica_id": r["replica_id"], "pid": r.get("pid"), "how": how, "killed_at": t}


def _poison_engine(_actor: Any) -> dict[str, Any]:
    """Runs inside a replica process (through `__ray_call__`): make the engine's decode loop die as a
    bug inside the loop would (its `_loop` catches it, records `fatal` and fails every row), without
    touching Serve's internals. The engine is found through its scheduler thread
    ("llm-continuous-batcher", whose target is the batcher's `_loop`)."""
    import os
    import threading

    def boom(*_: Any) -> Any:
        raise RuntimeError(INJECTED_FAULT)

    found = []
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        batcher = getattr(target, "__self__", None)
        if thread.name.startswith("llm-continuous-batcher") and batcher is not None and thread.is_alive():
            found.append(batcher)
    for batcher in found:
        batcher._take = boom  # the loop's next iteration raises
        batcher.abort("reliability-fault-injection")  # wakes an idle loop (an abort of no request)
    return {"engines": len(found), "pid": os.getpid(),
            "threads": sorted({t.name for t in threading.enumerate()})[:30]}


def kill_engine_loop(cluster: Cluster, app_name: str, replica_id: str | None = None) -> dict[str, Any]:
    """Make one replica's engine decode loop die; the replica process stays up, so only Serve's health
    check (`LLMServer.check_health`) can get it replaced."""
    ray = _require_ray()
    r = _pick(cluster, app_name, replica_id)
    t = time.time()
    found = ray.get(_serve_actor(ray, r).__ray_call__.remote(_poison_engine), timeout=120)
    if found["engines"] != 1:
        raise RuntimeError(f"expected one engine in replica {r['replica_id']} (pid {r.get('pid')}), found "
                           f"{found['engines']} in pid {found['pid']}; threads: {found['threads']}")
    return {"replica_id": r["replica_id"], "pid": r.get("pid"), "how": "engine_loop", "killed_at": t}


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
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, connect=5.0), headers=_headers(api_key)) as c:
        while time.monotonic() < deadline:
            try:
                r = c.get(base_url.rstrip("/") + "/stats")
                if r.status_code == 200 and r.json().get("replica") in replica_ids:
                    return time.time() - since
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
    return math.nan


# ---- load with a timeline --------------------------------------------------------------------------
@dataclass
class LoadTimeline:
    """A closed-loop load (`llmserve_nb.bench.run_benchmark`) plus what happened meanwhile.

    Times are seconds since the load's first request (the run's own clock): `events` (kills, updates,
    their outcomes) and `samples` (running replicas every `sample_every_s`) are shifted onto it, within
    a few ms. An action scheduled `at_s` into the load therefore shows at about `at_s` minus the
    client's set-up time."""

    run: BenchRun
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def per_second(self) -> list[dict[str, Any]]:
        """Per second of the load: completed requests, failed requests (by the time they ended) and the
        running replicas (the last sample in that second)."""
        n = max(1, math.ceil(self.run.duration_s))
        rows = [{"t": i, "ok": 0, "errors": 0, "replicas": None} for i in range(n)]
        for r in self.run.results:
            if math.isnan(r.end_s) or r.status not in ("ok", "error"):
                continue
            row = rows[min(n - 1, int(r.end_s))]
            row["ok" if r.status == "ok" else "errors"] += 1
        last = None
        samples = sorted(self.samples, key=lambda s: s["t"])
        j = 0
        for row in rows:
            while j < len(samples) and samples[j]["t"] < row["t"] + 1:
                last = samples[j]["running"]
                j += 1
            row["replicas"] = last
        return rows


def run_load(
    base_url: str,
    workload: Workload,
    *,
    concurrency: int,
    actions: list[tuple[float, str, Callable[[], Any]]] = (),
    cluster: Cluster | None = None,
    app_name: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    sample_every_s: float = 0.5,
) -> LoadTimeline:
    """Run `workload` closed-loop with `concurrency` users for `workload.duration_s` and, meanwhile, each
    action `(at_s, name, fn)`: `fn()` is called `at_s` seconds into the load, on a side thread, and its
    return value (or exception) is recorded as an event. With `cluster` and `app_name`, the running
    replicas are sampled throughout. Actions that outlast the load are waited for."""
    from llmserve_nb.bench import run_benchmark

    timeline_events: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    errors: list[str] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    wall0 = time.time()

    def sampler() -> None:
        while not stop.is_set():
            try:
                ids = running_ids(cluster, app_name)  # type: ignore[arg-type]
                samples.append({"t": time.perf_counter() - t0, "running": len(ids), "ids": sorted(ids)})
            except Exception as e:  # noqa: BLE001 - a missed sample is not a failed experiment
                errors.append(f"sample: {type(e).__name__}: {e}")
            stop.wait(sample_every_s)

    def actor() -> None:
        for at_s, name, fn in sorted(actions, key=lambda a: a[0]):
            delay = at_s - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter() - t0
            ev: dict[str, Any] = {"name": name, "t": start}
            try:
                ev["result"] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, the test decides
                ev["error"] = f"{type(e).__name__}: {e}"
            ev["t_end"] = time.perf_counter() - t0
            timeline_events.append(ev)

    threads = [threading.Thread(target=actor, name="reliability-actions", daemon=True)]
    if cluster is not None and app_name is not None:
        threads.append(threading.Thread(target=sampler, name="reliability-sampler", daemon=True))
    for t in threads:
        t.start()
    try:
        run = run_benchmark(base_url, workload, concurrency=concurrency, model=model, label="load",
                            progress=False, api_key=api_key)
        # The run's clock starts when its client is ready (its first send), a moment after t0 (up to a
        # second on a loaded machine); it ends `duration_s` later, just before run_benchmark returns.
        offset = max(0.0, (time.perf_counter() - t0) - run.duration_s)
        threads[0].join()
    finally:
        stop.set()
        for t in threads[1:]:
            t.join(timeout=10)
    # Everything on the run's clock: seconds since its first request was sent.
    for ev in timeline_events:
        ev["t"] -= offset
        ev["t_end"] -= offset
        ev["wall_start"] = wall0 + offset
    for sample in samples:
        sample["t"] -= offset
    return LoadTimeline(run, timeline_events, samples, errors)


def _is_backpressure(status: int | None, text: str) -> bool:
    """A refusal by Serve's admission control (max_queued_requests), not a failure of the request."""
    return status == 429 or (status == 503 and "backpressure" in text.lower())


def failure_summary(tl: LoadTimeline, kill_event: str | None = None) -> dict[str, Any]:
    """What the clients saw: sent, accepted (not refused for backpressure), succeeded, failed by kind
    (HTTP status or transport error, with an example message each), hung (ended by the client's own
    timeout: must be 0), and requests cut when the load ended (in flight, not hung)."""
    res = tl.run.results
    timeout_s = tl.run.workload.timeout_s
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
    hung += sum(1 for r in cut if tl.run.duration_s - r.start_s > timeout_s)
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
        "duration_s": round(tl.run.duration_s, 2),
    }
    ev = next((e for e in tl.events if e["name"] == kill_event), None) if kill_event else None
    if ev is not None:
        result = ev.get("result") or {}
        out["kill"] = {k: result.get(k) for k in ("replica_id", "pid", "how")} if isinstance(result, dict) else result
        out["kill_at_s"] = round(ev["t"], 2)
        if "error" in ev:
            out["kill_error"] = ev["error"]
        after = [r for r in res if r.status == "error" and r.end_s >= ev["t"]]
        out["failed_after_kill"] = len(after)
        out["last_failure_s_after_kill"] = round(max((r.end_s - ev["t"] for r in after), default=0.0), 2)
    return out


def plot_timeline(tl: LoadTimeline, title: str = "replica kill under load", ax=None):
    """Completed and failed requests per second, running replicas, and the events (kills, recovery)."""
    import matplotlib.pyplot as plt

    rows = tl.per_second()
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    t = [r["t"] + 0.5 for r in rows]
    ax.bar(t, [r["ok"] for r in rows], width=0.9, color="tab:green", label="completed / s")
    ax.bar(t, [r["errors"] for r in rows], width=0.9, bottom=[r["ok"] for r in rows], color="tab:red",
           label="failed / s")
    ax.set_xlabel("seconds into the load")
    ax.set_ylabel("requests per second")
    ax2 = ax.twinx()
    ax2.step([s["t"] for s in tl.samples], [s["running"] for s in tl.samples], where="post", color="tab:blue",
             label="running replicas")
    ax2.set_ylabel("running replicas")
    ax2.set_ylim(0, max([s["running"] for s in tl.samples] + [1]) + 1)
    for ev in tl.events:
        ax.axvline(ev["t"], color="black", ls="--", lw=1)
        ax.text(ev["t"], ax.get_ylim()[1] * 0.95, f" {ev['name']}", fontsize=8, va="top")
        rec = (ev.get("result") or {}).get("recovery_s") if isinstance(ev.get("result"), dict) else None
        if rec is not None and math.isfinite(rec):
            ax.axvline(ev["t"] + rec, color="tab:blue", ls=":", lw=1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    ax.set_title(title)
    return ax


def kill_and_recover(cluster: Cluster, app: AppHandle, how: str, target: int, timeout_s: float = 300.0,
                     replica_id: str | None = None) -> dict[str, Any]:
    """An action for `run_load`: kill one replica (`how`: ray_kill, sigkill or engine_loop), then wait
    until Serve runs `target` replicas again and a request is served by the replacement. Returns the
    kill record with `recovery_s` (kill → replacement RUNNING) and `serving_s` (kill → first answer
    from the replacement)."""
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


# ---- fuzzing the OpenAPI document --------------------------------------------------------------------
def fuzz_openapi(
    base_url: str,
    *,
    api_key: str | None = None,
    max_examples: int = 25,
    modes: tuple[str, ...] = ("positive", "negative"),
    max_tokens_cap: int | None = 8,
    request_timeout_s: float = 60.0,
    seed: int | None = 0,
    operations: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Property-based fuzzing of a live app with schemathesis (4.x): every operation of its
    `/openapi.json`, `max_examples` generated requests per operation and generation mode, each checked
    for no 5xx and conformance to the document (status code documented, content type, body schema,
    headers). Findings are grouped per (operation, failure, status) with a curl command that
    reproduces one (the API key shown as `$LLMSERVE_NB_API_KEY`).

    `max_tokens_cap` lowers generated `max_tokens` / `max_new_tokens` values between the cap and the
    server's limit to the cap, and sets it where a valid case leaves the field out, so that the budget
    is spent on inputs, not on decoding long answers (values above any limit are kept: they must get a
    400)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from hypothesis import seed as hypothesis_seed
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    base_url = base_url.rstrip("/")
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    headers = _headers(api_key)
    shown_headers = {"Authorization": "Bearer $LLMSERVE_NB_API_KEY"} if api_key else {}
    findings: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []

    def cap(case: Any, mode: str) -> None:
        body = case.body
        if max_tokens_cap and isinstance(body, dict):
            key = "max_new_tokens" if case.path == "/generate" else "max_tokens"
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and max_tokens_cap < v <= 512:
                body[key] = max_tokens_cap
            elif key not in body and mode == "positive":
                body[key] = max_tokens_cap  # the defaults (16, 64, 256 for chat) would spend the budget decoding

    for result in schema.get_all_operations():
        op = result.ok()
        if operations is not None and op.label not in operations:
            continue
        for mode in modes:
            stats = {"operation": op.label, "mode": mode, "cases": 0, "statuses": {}, "failed": 0}
            strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

            @given(case=strategy)
            @settings(max_examples=max_examples, deadline=None, database=None, 
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def one(case: Any) -> None:
                cap(case, mode)
                stats["cases"] += 1
                status = None
                try:
                    response = case.call(base_url=base_url, headers=headers, timeout=request_timeout_s)
                    status = response.status_code
                    stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                    case.validate_response(response, checks=checks, headers=headers)
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - a finding, with its reproduction
                    stats["failed"] += 1
                    failures = getattr(e, "exceptions", None) or [e]
                    for f in failures:
                        title = getattr(f, "title", None) or type(f).__name__
                        key = (op.label, title, status)
                        if key not in findings:
                            findings[key] = {
                                "operation": op.label, "mode": mode, "failure": title, "status": status,
                                "message": str(getattr(f, "message", "") or f)[:600],
                                "curl": case.as_curl_command(headers=shown_headers, base_url=base_url)[:2000],
                                "count": 0,
                            }
                        findings[key]["count"] += 1

            if seed is not None:
                one = hypothesis_seed(seed)(one)
            try:
                one()
            except Unsatisfiable:  # e.g. no invalid request exists for an operation without inputs
                stats["skipped"] = f"no {mode} data can be generated for this operation"
            stats["statuses"] = {str(k): v for k, v in sorted(stats["statuses"].items())}
            runs.append(stats)
    return {"operations": runs, "cases": sum(r["cases"] for r in runs), "findings": list(findings.values())}
