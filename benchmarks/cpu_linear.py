"""The transformers engine's Linear layers on torch's nn.Linear (MKL) against oneDNN with prepacked weights.

One process, one loaded model: both sets of layers are kept and swapped in turn, so both kernels run the
same weights on the same machine state. At each static batch size of `--levels` (fixed output length,
~30-token prompts) it runs the engine `--repeats` times per kernel, alternating the order, then prints
tok/s of each and their ratio with each repeat's, and how many of 8 chat prompts get the same greedy
answer from both. `EngineConfig.cpu_linear` picks the kernel for a served engine ("onednn" by default).

    python benchmarks/cpu_linear.py [--levels 1,8,32] [--min-requests 32] [--repeats 2] [--torch-threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from bench_common import add_workload_args, cpu_info, engine_limit, fixed_workload, levels_of, log
from llmserve_nb import bench
from llmserve_nb.config import EngineConfig

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
           "Explain gravity in one sentence.", "What is 12 times 12?", "Give me a name for a cat.",
           "Translate 'good morning' into French.", "Why is the sky blue?"]


def main(argv=None) -> int:
    import torch

    from llmserve_nb.engine import GenerationRequest, load_engine
    from llmserve_nb.engine.cpu_linear import PackedLinear

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, level_duration_s=600.0)
    p.set_defaults(levels="1,8,32", min_requests=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    wl = fixed_workload(args)

    engine = load_engine(EngineConfig(cpu_linear="torch", torch_threads=args.torch_threads))
    layers = [(parent, name, child) for parent in engine.model.modules() for name, child in parent.named_children()
              if type(child) is torch.nn.Linear]
    kernels = {"torch": [child for _, _, child in layers], "onednn": [PackedLinear(child) for _, _, child in layers]}

    def use(kernel: str) -> None:
        for (parent, name, _), module in zip(layers, kernels[kernel]):
            setattr(parent, name, module)

    chat = [GenerationRequest(messages=[{"role": "user", "content": q}], max_tokens=48) for q in PROMPTS]
    answers = {}
    for kernel in kernels:
        use(kernel)
        answers[kernel] = [r.text for r in engine.generate(chat)]
    rows = []
    for c in levels_of(args):
        for i in range(args.repeats):
            for kernel in ("torch", "onednn") if i % 2 == 0 else ("onednn", "torch"):
                use(kernel)
                rows.append({**engine_limit(engine, [c], wl, args.min_requests, kernel)[0], "repeat": i})

    df = pd.DataFrame(rows)
    paired = df.pivot_table(index=["concurrency", "repeat"], columns="label", values="output_tok_per_s")
    each = (paired["onednn"] / paired["torch"]).groupby(level=0).agg(lambda r: f"{r.min():.2f}-{r.max():.2f}")
    tps = df.pivot_table(index="concurrency", columns="label", values="output_tok_per_s")
    table = pd.DataFrame({"batch": tps.index, "nn.Linear tok/s": tps["torch"].values,
                          "oneDNN tok/s": tps["onednn"].values, "oneDNN ÷ nn.Linear": (tps["onednn"] / tps["torch"]).values,
                          "each repeat": each.reindex(tps.index).values})
    cpu = cpu_info()
    log("done")
    print(f"CPU: {cpu['model']}, {cpu['cpus']} CPUs ({cpu['flags']}); {engine.dtype}, {args.torch_threads} torch threads; "
          f"{len(layers)} Linear layers\n")
    print(bench.to_markdown(table))
    same = sum(a == b for a, b in zip(answers["torch"], answers["onednn"]))
    print(f"\nGreedy answers to {len(PROMPTS)} chat prompts, identical with both kernels: {same} of {len(PROMPTS)}")
    for q, a, b in zip(PROMPTS, answers["torch"], answers["onednn"]):
        if a != b:
            print(f"- {q!r}: {a[:80]!r} vs {b[:80]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
