"""Which rendering settings close the gap between our Ray Serve LLM app and the bare vLLM OpenAI server.

One run, back to back on the same machine: the bare vLLM server (same vLLM release, the venv of
`llmserve-nb vllm-env`; same model dir, `llmserve_nb.engine.local_model_dir()`; same dtype; `--enforce-eager`
on both sides), then `AppConfig(engine=EngineConfig(backend="vllm"))` rendered by `llmserve_nb.backends.vllm.render` under
a few candidate settings, each deployed in turn on one Ray head started from that venv, then the bare server
once more (the ratios use the mean of its two runs, which brackets the drift of a shared machine).

Load (`llmserve_nb.bench`, streamed `/v1/completions`, 30-token prompts): fixed 64 tokens with `ignore_eos`
at concurrency 1 (TTFT), 8 and 32, and a mixed-length workload (8-128 tokens log-uniform, EOS honoured)
at concurrency 8. Every request, level, start-up and deploy is bounded in time, and so is the whole run
(`--budget-minutes`: no new system starts after it).

Prints a markdown table of ratios to the bare server (throughput ratio >= 0.9 and TTFT ratio <= 1.2 are the
targets) plus the raw figures and the load average at each step:

    .venv/bin/python benchmarks/serve_llm_settings.py                                   # fp32, all candidates
    .venv/bin/python benchmarks/serve_llm_settings.py --dtypes float32,bfloat16 --candidates rendered,quiet
    .venv/bin/python benchmarks/serve_llm_settings.py --candidates rendered,haproxy,haproxy+direct \
        --workloads c1,c8,c32 --budget-minutes 13                                      # direct streaming

Candidates (each a change on top of what `vllm_app` renders today; `rendered` = no change):
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import CACHE, MODEL_NAME, REPO, cpu_info, log, ray_head  # noqa: E402
from vllm_peer import vllm_server  # noqa: E402

from llmserve_nb import bench  # noqa: E402
from llmserve_nb.cluster.ports import free_port  # noqa: E402
from llmserve_nb.backends.vllm import VllmBackend  # noqa: E402
from llmserve_nb.backends.vllm import render as vllm_app  # noqa: E402
from llmserve_nb.experiments.reliability import probe  # noqa: E402

DEFAULT_VENV = CACHE / "vllm-0.29.0-venv"
KEY = "bench-" + secrets.token_hex(6)


def _llm(app: dict) -> dict:
    return app["args"]["llm_configs"][0]


def _env(app: dict, **env: str) -> None:
    _llm(app).setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)


def _stream_batching(ms: int) -> Callable[[dict], None]:
    def change(app: dict) -> None:
        _llm(app).setdefault("experimental_configs", {})["stream_batching_interval_ms"] = ms
    return change


def _quiet(app: dict) -> None:
    # Serve's per-request access log lines (proxy and both replicas) and Ray Serve LLM's prompt log.
    app["logging_config"] = {"enable_access_log": False, "log_level": "WARNING"}
    _env(app, RAYLLM_ENABLE_REQUEST_PROMPT_LOGS="0")


def _nice0(app: dict) -> None:
    _env(app, RAY_worker_niceness="0")


def _no_engine_metrics(app: dict) -> None:
    _llm(app)["log_engine_metrics"] = False


def _bind(app: dict) -> None:
    """Pin the engine's OMP threads to cores 0..n-1 (how the bare server is run), n = the rendered threads."""
    env = _llm(app)["runtime_env"]["env_vars"]
    n = int(env.pop("OMP_NUM_THREADS", "0") or 0) or int(env["VLLM_CPU_OMP_THREADS_BIND"].split("-")[-1]) + 1
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{n - 1}" if n > 1 else "0"


def _both(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(app: dict) -> None:
        for c in changes:
            c(app)
    return change


# name -> (AppConfig overrides, change to the rendered application entry, what it is)
CANDIDATES: dict[str, tuple[dict[str, Any], Callable[[dict], None] | None, str]] = {
    "rendered": ({}, None, "what vllm_app renders (ingress 0 CPU; engine threads unpinned: OMP bind `nobind`)"),
    "stream100": ({}, _stream_batching(100), "experimental_configs.stream_batching_interval_ms=100 (default 50)"),
    "stream0": ({}, _stream_batching(0), "stream_batching_interval_ms=0: every chunk sent as it comes"),
    "quiet": ({}, _quiet, "Serve access log off, app log level WARNING, RAYLLM_ENABLE_REQUEST_PROMPT_LOGS=0"),
    "nometrics": ({}, _no_engine_metrics, "log_engine_metrics=False (no ray_vllm_* metrics)"),
    "engine1core": ({"engine.torch_threads": 1}, None, "engine binds core 0 only: core 1 left to proxy+ingress"),
    "bind": ({}, _bind, "VLLM_CPU_OMP_THREADS_BIND=0-<threads-1>: OMP threads pinned, as the bare server runs"),
    "quiet+stream100": ({}, _both(_quiet, _stream_batching(100)), "quiet and stream100"),
    "throughput": ({}, None, "Ray head started with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC between replicas, user "
                   "code and router on the replica's main loop, no log to stderr, GC frozen after start)"),
    "haproxy": ({}, None, "throughput + RAY_SERVE_ENABLE_HA_PROXY=1: Debian's haproxy replaces Serve's Python "
                "proxy and forwards to the ingress replica's own port (Ray's KubeRay high-throughput mode)"),
    "haproxy+quiet": ({}, _quiet, "haproxy and quiet"),
    "nice0": ({}, _nice0, "RAY_worker_niceness=0 in the app's runtime_env: its replicas and vLLM's engine process "
              "run at nice 0 like the bare server, instead of the nice 15 Ray gives every worker"),
    "haproxy+nice0": ({}, _nice0, "haproxy and nice0"),
    "haproxy+nice0head": ({}, None, "haproxy, and RAY_worker_niceness=0 in the Ray head's environment: every worker "
                          "(proxy, HAProxy, controller, replicas, vLLM's engine) at nice 0, not only the app's"),
    "haproxy+direct": ({"runtime_env": {"env_vars": {"LLMSERVE_NB_API_KEY": KEY, **vllm_app.DIRECT_STREAMING_ENV}}},
                       None, "haproxy, and Ray's direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 in the "
                       "app's runtime_env): no ingress replica, HAProxy forwards to the LLMServer replica, which "
                       "answers with vLLM's own app behind our key layer (Serve builds it only with HAProxy)"),
}
# Settings that live in the Ray head's environment (read by Serve's controller and proxies at start):
# each such candidate gets a Ray head of its own.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# What the vLLM RayService renders (vllm_app.HIGH_THROUGHPUT_ENV), with one HAProxy thread for 2 cores.
HAPROXY_ENV = {**vllm_app.HIGH_THROUGHPUT_ENV, "RAY_SERVE_HAPROXY_NBTHREAD": "1"}
HEAD_ENV: dict[str, dict[str, str]] = {"throughput": THROUGHPUT_ENV, "haproxy": HAPROXY_ENV, "haproxy+quiet": HAPROXY_ENV,
                                     "haproxy+nice0": HAPROXY_ENV, "haproxy+direct": HAPROXY_ENV,
                                     "haproxy+nice0head": {**HAPROXY_ENV, "RAY_worker_niceness": "0"}}
__doc__ += "".join(f"\n- `{k}`: {v[2]}" for k, v in CANDIDATES.items())


WORKLOADS = ("c1", "c8", "c32", "mixed")


def workloads(args) -> list[tuple[str, int, bench.Workload]]:
    """(name, concurrency, workload): the fixed one at each level, the mixed one at 8 (those in --workloads)."""
    fixed = dict(input_tokens=30, output_tokens=64, ignore_eos=True, duration_s=args.level_timeout_s,
                 timeout_s=120.0)
    out = [(f"fixed c={c}", c, bench.Workload(num_requests=max(args.ttft_requests if c == 1 else 0,
                                                                args.per_user * c), **fixed))
           for c in (1, 8, 32) if f"c{c}" in args.workloads]
    if "mixed" in args.workloads:
        mixed = bench.mixed_workload(num_requests=2 * 8, output_tokens=(8, 128), input_tokens=30,
                                     duration_s=args.level_timeout_s, timeout_s=120.0)
        out.append(("mixed c=8", 8, mixed))
    return out


def drive(label: str, url: str, api_key: str | None, args) -> list[dict]:
    warm = bench.Workload(num_requests=2, input_tokens=30, output_tokens=8, timeout_s=120.0, duration_s=60.0)
    bench.run_benchmark(url, warm, concurrency=2, model=MODEL_NAME, label="warm-up", progress=False, api_key=api_key)
    rows = []
    for name, c, wl in workloads(args):
        s = bench.run_benchmark(url, wl, concurrency=c, model=MODEL_NAME, label=label, progress=False,
                                api_key=api_key).summary()
        row = {"system": label, "workload": name, "load1": round(os.getloadavg()[0], 2),
               **{k: s.get(k) for k in ("completed", "errors", "output_tok_per_s", "ttft_ms_p50", "e2e_ms_p50")}}
        log(json.dumps(row))
        rows.append(row)
    return rows


@contextlib.contextmanager
def rendering(change: Callable[[dict], None] | None):
    """`VllmBackend.application` with `change` applied to its result (also what `_is_current` compares)."""
    if change is None:
        yield
        return
    original = VllmBackend.application

    def patched(self, config):
        app = copy.deepcopy(original(self, config))
        change(app)
        return app

    with mock.patch.object(VllmBackend, "application", patched):
        yield


def wait_running(app, timeout_s: float) -> None:
    """RUNNING and /health answers (the app was deleted before, so RUNNING is this deploy's). Not
    `AppHandle.wait_running`: Serve may echo a candidate's extra keys (logging_config) with more fields."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = app.status()
        if st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"{st.status}: {st.serve_messages()}")
        if st.status == "RUNNING":
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{app.base_url}/health", timeout=5).status_code == 200:
                    return
        time.sleep(2.0)
    raise TimeoutError(f"app not RUNNING after {timeout_s:.0f} s")


def base_config(dtype: str):
    from llmserve_nb.config import AppConfig, DeploymentConfig, EngineConfig

    return AppConfig(
        name="settings",
        engine=EngineConfig(backend="vllm", dtype=dtype, max_model_len=2048, engine_kwargs={"enforce_eager": True}),
        deployment=DeploymentConfig(num_cpus=2),  # the whole 2-core node, as the bare server gets
        runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": KEY}},
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the vLLM venv (`llmserve-nb vllm-env`)")
    p.add_argument("--dtypes", default="float32", help="comma list from float32,bfloat16")
    p.add_argument("--candidates", default="rendered,bind,quiet,stream100",
                   help=f"comma list from {','.join(CANDIDATES)}")
    p.add_argument("--other-dtype-candidates", default="rendered",
                   help="candidates for the dtypes after the first (default: only `rendered`)")
    p.add_argument("--per-user", type=int, default=2, help="requests per user at c=8 and c=32")
    p.add_argument("--ttft-requests", type=int, default=6, help="requests at c=1")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--level-timeout-s", type=float, default=120.0, help="each level stops after this")
    p.add_argument("--deploy-timeout-s", type=float, default=420.0)
    p.add_argument("--budget-minutes", type=float, default=40.0, help="no new system starts after this")
    p.add_argument("--bare-nobind", action="store_true",
                   help="also the bare server with VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=2")
    p.add_argument("--no-bare-again", action="store_true", help="skip the closing bare run")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "serve_llm_settings")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if set(args.workloads) - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(set(args.workloads) - set(WORKLOADS))}")
    # SIGTERM (e.g. `timeout`) unwinds like an exception, so the servers and the Ray head are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [c for c in args.candidates.split(",") if c]
    if set(names) - set(CANDIDATES):
        p.error(f"unknown candidates {sorted(set(names) - set(CANDIDATES))}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    other = [c for c in args.other_dtype_candidates.split(",") if c]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows: list[dict] = []
    notes: list[str] = []

    def step(label: str, fn) -> None:
        if time.monotonic() - t0 > args.budget_minutes * 60:
            notes.append(f"{label}: not run (past the {args.budget_minutes:g}-minute budget)")
            log(notes[-1])
            return
        log(f"--- {label} (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        try:
            rows.extend(fn())
        except Exception as e:  # one failed system must not lose the others' figures
            notes.append(f"{label}: failed: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
            log(notes[-1])
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))

    def bare(dtype: str, label: str, nobind: bool = False):
        def run():
            saved = os.environ.get("OMP_NUM_THREADS")
            if nobind:
                os.environ["OMP_NUM_THREADS"] = "2"
            try:
                with vllm_server(dtype, free_port(), venv=args.venv, threads_bind="nobind" if nobind else "0-1") as url:
                    return drive(label, url, None, args)
            finally:
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
        return run

    for dtype in dtypes:
        step(f"bare {dtype}", bare(dtype, f"bare {dtype}"))
    if args.bare_nobind:
        step("bare-nobind float32", bare("float32", "bare-nobind float32", nobind=True))

    from llmserve_nb.cluster import connect

    def ray_candidates(group: list[str], head_env: dict[str, str]):
        env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **head_env}
        with ray_head("serve-llm-settings", ray_bin=args.venv / "bin" / "ray", num_cpus=2, env_extra=env) as head:
            cluster = connect(address=head.dashboard_url, serve_url=head.serve_url, token=head.token)
            for dtype in dtypes:
                for name in (group if dtype == dtypes[0] else [n for n in other if n in group]):
                    overrides, change, _ = CANDIDATES[name]
                    label = f"ours {name} {dtype}"

                    def one(overrides=overrides, change=change, dtype=dtype, label=label):
                        cfg = base_config(dtype).with_overrides(**overrides) if overrides else base_config(dtype)
                        with rendering(change):
                            t = time.monotonic()
                            app = cluster.deploy(cfg, wait=False)
                            wait_running(app, args.deploy_timeout_s)
                            log(f"{label}: deployed in {time.monotonic() - t:.0f} s")
                            # Every setting must keep the ingress's key check.
                            refused = probe(app.base_url, body={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2},
                                            api_key="wrong-" + KEY)["status"]
                            generate = probe(app.base_url, "/generate", body={"prompt": "Hi", "max_new_tokens": 2},
                                             api_key=KEY)["status"]
                            notes.append(f"{label}: a wrong API key got HTTP {refused}"
                                         + ("" if refused == 401 else " (NOT REFUSED: the key check is bypassed)")
                                         + f"; /generate with the key got HTTP {generate}")
                            try:
                                return drive(label, app.base_url, KEY, args)
                            finally:
                                app.shutdown()
                    step(label, one)
            cluster.shutdown()
        return []

    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names + (other if len(dtypes) > 1 else [])):
        groups.setdefault(json.dumps(HEAD_ENV.get(name, {}), sort_keys=True), []).append(name)
    for env_key, group in groups.items():
        step(f"ray head {env_key}", lambda group=group, env_key=env_key: ray_candidates(group, json.loads(env_key)))
    if not args.no_bare_again:
        step("bare float32 again", bare("float32", "bare float32"))
    text = report(rows, dtypes, names, notes, (time.monotonic() - t0) / 60)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


def _metric(rows, system, workload, key) -> float:
    vals = [r[key] for r in rows if r["system"] == system and r["workload"] == workload and r.get(key) is not None
            and r.get("completed")]
    return sum(vals) / len(vals) if vals else float("nan")


def report(rows, dtypes, names, notes, minutes) -> str:
    cpu = cpu_info()
    lines = [f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); run took {minutes:.1f} min; "
             f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", "",
             "| system | tok/s c=8 (ratio) | tok/s c=32 (ratio) | mixed useful tok/s c=8 (ratio) | "
             "TTFT p50 c=1 ms (ratio) | load1 |",
             "|---|---|---|---|---|---|"]
    wls = {"c8": "fixed c=8", "c32": "fixed c=32", "mixed": "mixed c=8", "c1": "fixed c=1"}
    for dtype in dtypes:
        ref = f"bare {dtype}"
        base = {k: _metric(rows, ref, w, "ttft_ms_p50" if k == "c1" else "output_tok_per_s") for k, w in wls.items()}
        for system in [ref, f"bare-nobind {dtype}"] + [f"ours {n} {dtype}" for n in CANDIDATES]:
            if not any(r["system"] == system for r in rows):
                continue
            cells = []
            for k, w in wls.items():
                metric = "ttft_ms_p50" if k == "c1" else "output_tok_per_s"
                v = _metric(rows, system, w, metric)
                cells.append(f"{v:.1f} ({v / base[k]:.2f}x)" if base[k] == base[k] and base[k] else f"{v:.1f}")
            load = [r["load1"] for r in rows if r["system"] == system]
            lines.append(f"| {system} | " + " | ".join(cells) + f" | {min(load):.1f}-{max(load):.1f} |")
    lines += ["", "Targets: tok/s ratio >= 0.9 at c=8 and c=32, TTFT ratio <= 1.2 at c=1. "
              "Bare rows are the mean of the runs before and after the Ray candidates.",
              "", *[f"- {n}" for n in notes]]
    errs = [r for r in rows if r.get("errors")]
    if errs:
        lines.append(f"- errors in {len(errs)} runs: " + ", ".join(f"{r['system']} {r['workload']}" for r in errs))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
