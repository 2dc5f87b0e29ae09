"""Cold-start time of the engine: GGUF dequantisation vs the cached safetensors copy.

Each load runs in a fresh Python process (imports included, as a new Serve replica would pay),
with an empty cache directory for the first and the populated one for the second. Prints a table.

    python benchmarks/cold_start.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, time
t0 = time.perf_counter()
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest, load_engine
t_import = time.perf_counter() - t0
e = load_engine(EngineConfig(cache_dir={cache!r}))
t_loaded = time.perf_counter() - t0
text = e.generate([GenerationRequest(messages=[{{"role": "user", "content": "What is the capital of France?"}}], max_tokens=16)])[0].text
print(json.dumps({{"cache": e.load_timings["cache"], "import_s": t_import, "load_s": e.load_timings["total_load_s"],
                  "to_ready_s": t_loaded, "first_answer_s": time.perf_counter() - t0, "answer": text}}))
"""


def run(cache: str) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(cache=cache)], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            rows.append(("GGUF (cache miss: dequantise + write safetensors)", run(cache)))
            rows.append(("cached safetensors (hit)", run(cache)))
    print("| load path | engine load s | process to ready s | first answer s | answer |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['load_s']:.1f} | {r['to_ready_s']:.1f} | {r['first_answer_s']:.1f} | {r['answer'][:40]} |")
    miss = [r["load_s"] for label, r in rows if r["cache"] == "miss"]
    hit = [r["load_s"] for label, r in rows if r["cache"] == "hit"]
    print(f"\nengine load, GGUF / cached: {sum(miss) / len(miss):.1f} s / {sum(hit) / len(hit):.1f} s "
          f"= {sum(miss) / sum(hit) * len(hit) / len(miss):.1f}x")


if __name__ == "__main__":
    main()
