"""Ray Serve's fast path for the transformers app: Serve's defaults against `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`
and against that plus Ray's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`), measured side by side.

They are settings of the Ray cluster (`llmserve_nb.cluster.fastpath`), so each run starts a fresh Ray head
with the setting in its environment, deploys this checkout's app (one replica, max_batch_size 32, an API
key), and drives it with `llmserve_nb.bench`: streamed `/v1/completions`, ~30-token prompts, exactly 64
tokens (ignore_eos), closed loop at c=1 (TTFT p50), c=8 and c=32 (output tok/s). Runs follow `--order`
(default: default, throughput, haproxy, default), so the repeated setting brackets the others and the
machine's drift shows; ratios are to the mean of the `default` runs.

Each run also records what the setting changes besides speed: the status a wrong API key gets (must be
401), the seconds the deploy and the app's delete took (direct ingress drains a stopping replica for
`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`: `--drain-s`, by default what the embedded Ray gets; Ray's
own default is 30 s), and the cores each kind of process used at c=32. HAProxy runs with Ray's defaults
(4 threads), its files and stats/metrics ports per head (`haproxy_instance_env`).

    flock /tmp/team/bench.lock flock /tmp/team/ray.lock .venv/bin/python benchmarks/serve_fastpath.py
    .venv/bin/python benchmarks/serve_fastpath.py --order default,haproxy --per-user 1 --ttft-requests 2  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODEL_NAME, REPO, cpu_by_process, cpu_info, log, ray_head  # noqa: E402

from llmserve_nb import bench  # noqa: E402
from llmserve_nb.cluster import connect  # noqa: E402
from llmserve_nb.cluster.fastpath import (  # noqa: E402
    EMBEDDED_DRAIN_ENV, HAPROXY_ENV, THROUGHPUT_ENV, haproxy_instance_env,
)
from llmserve_nb.cluster.ports import free_ports  # noqa: E402
from llmserve_nb.config import API_KEY_ENV, AppConfig  # noqa: E402

KEY = "fastpath-bench-key"
SETTINGS = {"default": {}, "throughput": THROUGHPUT_ENV, "haproxy": HAPROXY_ENV}
LEVELS = (1, 8, 32)
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def head_env(setting: str, state_dir: Path, drain_s: float) -> dict[str, str]:
    env = dict(SETTINGS[setting])
    if setting == "haproxy":
        ports = free_ports(["stats", "metrics"])
        env.update(haproxy_instance_env(state_dir, ports["stats"], ports["metrics"]))
    if setting != "default":
        env[DRAIN] = f"{drain_s:g}"
    return env


def one_run(setting: str, index: int, args) -> dict:
    """A fresh Ray head with `setting`, the app deployed on it, the three levels; one summary row."""
    label = f"{setting} #{index}"
    row: dict = {"setting": setting, "run": index, "load1_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="fastpath-") as tmp, \
            ray_head(f"fastpath-{setting}", num_cpus=2, env_extra=head_env(setting, Path(tmp), args.drain_s)) as head:
        cluster = connect(address=head.dashboard_url, serve_url=head.serve_url, token=head.token)
        cfg = AppConfig(name="fastpath", runtime_env={"env_vars": {API_KEY_ENV: KEY}}).with_overrides(
            **{"batching.max_batch_size": max(LEVELS), "engine.torch_threads": 2, "deployment.num_cpus": 2})
        t = time.monotonic()
        app = cluster.deploy(cfg, progress=None)
        row["deploy_s"] = round(time.monotonic() - t, 1)
        row["wrong_key_status"] = httpx.post(f"{app.base_url}/v1/completions", timeout=30,
                                             headers={"Authorization": "Bearer wrong"},
                                             json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}).status_code
        kw = dict(model=MODEL_NAME, api_key=KEY, progress=False, label=label)
        fixed = dict(input_tokens=30, output_tokens=64, ignore_eos=True, duration_s=args.level_timeout_s,
                     timeout_s=120.0)
        bench.run_benchmark(app.base_url, bench.Workload(num_requests=2, input_tokens=30, output_tokens=8,
                                                         timeout_s=120.0), concurrency=2, **kw)
        for c in LEVELS:
            n = args.ttft_requests if c == 1 else args.per_user * c
            with cpu_by_process() as cores:
                s = bench.run_benchmark(app.base_url, bench.Workload(num_requests=n, **fixed), concurrency=c,
                                        **kw).summary()
            row[f"c{c}"] = {k: s.get(k) for k in ("completed", "errors", "output_tok_per_s", "ttft_ms_p50",
                                                   "e2e_ms_p50")}
            if c == max(LEVELS):
                row["cores"] = dict(sorted(cores.items()))
            log(f"{label} c={c}: {json.dumps(row[f'c{c}'])}")
        t = time.monotonic()
        app.shutdown()
        row["delete_s"] = round(time.monotonic() - t, 1)
        cluster.close()
    row["load1_end"] = round(os.getloadavg()[0], 2)
    return row


def _mean(rows: list[dict], setting: str, level: int, key: str) -> float:
    vals = [r[f"c{level}"][key] for r in rows if r["setting"] == setting and r.get(f"c{level}", {}).get(key)]
    return sum(vals) / len(vals) if vals else float("nan")


def report(rows: list[dict], order: list[str], minutes: float) -> str:
    cpu = cpu_info()
    out = [f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); {minutes:.1f} min", "",
           "Each run (fresh Ray head each, in this order):", "",
           "| run | TTFT p50 c=1 ms | tok/s c=8 | tok/s c=32 | errors | wrong key | deploy s | delete s | "
           "cores at c=32 | load1 start-end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "c32" not in r:
            out.append(f"| {r['setting']} #{r['run']} | failed: {r.get('error', '?')} |||||||||")
            continue
        errors = sum(r[f"c{c}"]["errors"] or 0 for c in LEVELS)
        cores = ", ".join(f"{k} {v:.2f}" for k, v in r["cores"].items())
        out.append(f"| {r['setting']} #{r['run']} | {r['c1']['ttft_ms_p50']:.0f} | {r['c8']['output_tok_per_s']:.1f} "
                   f"| {r['c32']['output_tok_per_s']:.1f} | {errors} | {r['wrong_key_status']} | {r['deploy_s']} "
                   f"| {r['delete_s']} | {cores} | {r['load1_start']}-{r['load1_end']} |")
    base = {c: _mean(rows, "default", c, "ttft_ms_p50" if c == 1 else "output_tok_per_s") for c in LEVELS}
    out += ["", "Mean per setting, ratios to the mean of the `default` runs (TTFT: lower is better):", "",
            "| setting | TTFT p50 c=1 ms | ÷ default | tok/s c=8 | ÷ default | tok/s c=32 | ÷ default |",
            "|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(order):
        cells = []
        for c in LEVELS:
            v = _mean(rows, setting, c, "ttft_ms_p50" if c == 1 else "output_tok_per_s")
            cells += [f"{v:.0f}" if c == 1 else f"{v:.1f}", f"{v / base[c]:.2f}" if base[c] == base[c] else "-"]
        out.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--order", default="default,throughput,haproxy,default",
                   help=f"comma list of settings from {','.join(SETTINGS)}, one Ray head each, in this order")
    p.add_argument("--per-user", type=int, default=2, help="requests per user at c=8 and c=32")
    p.add_argument("--ttft-requests", type=int, default=6, help="requests at c=1")
    p.add_argument("--level-timeout-s", type=float, default=120.0, help="each level stops after this")
    p.add_argument("--drain-s", type=float, default=float(EMBEDDED_DRAIN_ENV[DRAIN]),
                   help=f"{DRAIN} for the fast-path heads (default: what the embedded Ray gets; Ray's own: 30)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "serve_fastpath")
    args = p.parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like an exception, so the Ray heads are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    order = [s for s in args.order.split(",") if s]
    if set(order) - set(SETTINGS):
        p.error(f"unknown settings {sorted(set(order) - set(SETTINGS))}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows: list[dict] = []
    for i, setting in enumerate(order, 1):
        log(f"--- {setting} (run {i}/{len(order)}; load average {os.getloadavg()[0]:.2f})")
        try:
            rows.append(one_run(setting, i, args))
        except Exception as e:  # one failed setting must not lose the others' figures
            rows.append({"setting": setting, "run": i,
                         "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][-200:]}"})
            log(f"{setting} #{i} failed: {rows[-1]['error']}")
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    text = report(rows, order, (time.monotonic() - t0) / 60)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
