"""The transformers engine on a CUDA GPU: correctness of the GPU path and its throughput, in one run.

    python benchmarks/gpu_engine.py [--model-dir DIR --gguf-file F] [--out results.json]

Checks (each printed as PASS/FAIL; the exit code is non-zero if one fails):
- dtype "auto" picks bf16 (fp16 without bf16) on the GPU and the greedy answer is still right;
- one static batch of mixed requests gives the same greedy text as each request alone (fp32), and how
  many agree in bf16 (batch shape changes bf16 rounding, so exact agreement is reported, not required);
- continuous batching through the engine protocol: requests joining a running batch, a short request
  ending long before its long peer, an abort leaving within a step, and the KV cache width bounded by
  the longest request;
then a throughput table (generated tok/s) of static batches 1..128 in bf16 and fp32, and of the
continuous batcher under a mixed-length load. Needs no Ray.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import torch

from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest as Req
from llmserve_nb.engine import HFEngine, TransformersEngine

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MIXED = [
    Req(messages=FRANCE, max_tokens=24),
    Req(prompt="Once upon a time", max_tokens=20),
    Req(messages=[{"role": "user", "content": "Write a poem about the sea and the sky."}], max_tokens=30),
    Req(prompt="def fibonacci(n):", max_tokens=12),
    Req(messages=[{"role": "user", "content": "Name three colours."}], max_tokens=16),
    Req(prompt="The quick brown fox", max_tokens=28),
]

checks: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    checks.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def throughput(engine: HFEngine, batch: int, tokens: int) -> float:
    reqs = [Req(prompt=f"Story number {i}: once upon a time", max_tokens=tokens, ignore_eos=True) for i in range(batch)]
    engine.generate(reqs[: min(batch, 2)])  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    torch.cuda.synchronize()
    return sum(r.completion_tokens for r in out) / (time.perf_counter() - t0)


async def protocol_checks(served: TransformersEngine) -> dict:
    async def start(reqs):
        prepared = [await served.prepare(r) for r in reqs]
        return prepared, served.submit(prepared)

    _, (short, long) = await start([Req(prompt="Hi", max_tokens=8, ignore_eos=True),
                                    Req(prompt="Tell me a long story", max_tokens=300, ignore_eos=True)])
    await short.collect()
    check("a short request ends before its long admission peer", not long.finished)
    await long.collect()

    alone = [served.model.generate([r])[0].text for r in MIXED]
    _, first = await start(MIXED[:3])
    while served.stats()["decode_steps"] < 3:
        await asyncio.sleep(0.005)
    _, second = await start(MIXED[3:])
    joined = [(await s.collect()).text for s in first + second]
    same = sum(a == b for a, b in zip(alone, joined))
    exact = served.model.dtype == torch.float32
    check(f"requests joining a running batch keep their greedy text ({served.model.dtype})",
          same >= len(MIXED) - 1 if exact else True, f"{same}/{len(MIXED)} identical" + ("" if exact else ", reported"))

    p, (st,) = await start([Req(prompt="Write forever", max_tokens=1000, ignore_eos=True)])
    n = 0
    async for _ in st:
        n += 1
        if n == 5:
            served.abort(p[0].request_id)
    check("abort ends a running request at once", st.result.finish_reason == "abort" and st.result.completion_tokens < 12,
          f"{st.result.completion_tokens} tokens")

    rng = random.Random(0)
    reqs = [Req(prompt=" ".join(["word"] * rng.randint(4, 64)), max_tokens=rng.choice([16, 32, 64, 128, 256, 512]),
                ignore_eos=False) for _ in range(256)]
    longest = 0
    t0 = time.perf_counter()
    in_flight: set = set()
    done_tokens = 0
    while reqs or in_flight:
        while reqs and len(in_flight) < 64:
            pr = await served.prepare(reqs.pop())
            longest = max(longest, len(pr.prompt_ids) + pr.request.max_tokens)
            in_flight.add(asyncio.ensure_future(served.submit([pr])[0].collect()))
        done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        done_tokens += sum(d.result().completion_tokens for d in done)
    wall = time.perf_counter() - t0
    stats = served.stats()
    check("KV cache width stays within the longest request under mixed load",
          stats["kv_cache_width_max"] <= longest, f"width max {stats['kv_cache_width_max']} <= {longest}")
    return {"continuous_mixed_256_c64_tok_s": round(done_tokens / wall, 1), "decode_steps": stats["decode_steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="a GGUF folder or HF model dir (default: the embedded model)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible; this script checks the GPU path", file=sys.stderr)
        return 2
    base = {"cache_dir": args.cache_dir}
    if args.model_dir:
        base.update(model_source=args.model_dir, gguf_file=args.gguf_file, served_model_name="SmolLM2-135M-Instruct")
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(json.dumps(report), flush=True)

    auto = HFEngine(EngineConfig(**base))
    report["auto"] = {"device": auto.device, "dtype": str(auto.dtype), "load_s": round(auto.load_timings["total_load_s"], 2)}
    check("dtype auto on the GPU is bf16 (or fp16 without bf16)",
          auto.device == "cuda" and auto.dtype in (torch.bfloat16, torch.float16), str(auto.dtype))
    answer = auto.generate([Req(messages=FRANCE, max_tokens=32)])[0].text
    check("greedy answer on the GPU in bf16", "Paris" in answer, repr(answer))
    batched = [r.text for r in auto.generate(MIXED)]
    alone = [auto.generate([r])[0].text for r in MIXED]
    report["bf16_batched_equals_alone"] = f"{sum(a == b for a, b in zip(batched, alone))}/{len(MIXED)}"

    fp32 = HFEngine(EngineConfig(**base, dtype="float32"))
    b32 = [r.text for r in fp32.generate(MIXED)]
    a32 = [fp32.generate([r])[0].text for r in MIXED]
    check("fp32 on the GPU: a batch gives each request's solo greedy text", sum(a == b for a, b in zip(a32, b32)) >= len(MIXED) - 1,
          f"{sum(a == b for a, b in zip(a32, b32))}/{len(MIXED)}; bf16 {report['bf16_batched_equals_alone']}")

    rows = []
    for batch in (1, 8, 32, 128):
        rows.append({"batch": batch, "bf16_tok_s": round(throughput(auto, batch, 128), 1),
                     "fp32_tok_s": round(throughput(fp32, batch, 128), 1)})
    report["static_batch_tok_s"] = rows
    print("\n| batch | bf16 tok/s | fp32 tok/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['bf16_tok_s']} | {r['fp32_tok_s']} |")

    # The join check compares greedy text, so it runs in fp32 (bf16 rounding depends on the batch shape);
    # the mixed-load throughput is the default (auto = bf16) engine's.
    report["continuous_fp32"] = asyncio.run(protocol_checks(TransformersEngine(EngineConfig(**base, dtype="float32"), model=fp32)))
    report["continuous"] = asyncio.run(protocol_checks(TransformersEngine(EngineConfig(**base), model=auto)))
    print(json.dumps({"fp32": report["continuous_fp32"], "auto": report["continuous"]}))
    report["checks"] = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    failed = [n for n, ok, _ in checks if not ok]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
