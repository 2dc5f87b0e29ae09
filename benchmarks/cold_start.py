"""Cold start: the engine's load in a fresh process, and a served deploy from the call to RUNNING.

Default mode: each load runs in a fresh Python process (imports included, as a new Serve replica
would pay), with an empty cache directory for the first and the populated one for the second, and
the process's time split into imports, tokenizer, weights and oneDNN prepacking.

`--served`: `llmserve_nb.connect()` (an embedded local Ray), then `cluster.deploy(AppConfig())` of the
default app, timed from the deploy call to RUNNING and split by what Serve, the replica and the client
logged: the PUT, the Serve controller reacting, the app's build task (a worker process importing the
app), the replica's worker process, its imports, the engine load (and prepacking), Serve's readiness
check, and the client noticing (its status poll and the route probe). The first deploy starts Serve
itself, as in every notebook; `--deploys N` deletes the app and deploys it again on the same Serve.

    python benchmarks/cold_start.py [--repeats 2] [--cached-only]
    python benchmarks/cold_start.py --served [--deploys 2] [--variants base,block:rfc3987_syntax,...]

`--variants` runs each on its own fresh embedded Ray and prints them side by side: `block:MODULE` makes a
module unimportable for the kernel and every Ray worker (as if not installed), `patch:PATH=FILE` runs this
package with one file replaced (a change measured before it is made), `set:PATH=VALUE` deploys the app with
that `AppConfig` override (`set:engine.engine_core=thread`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

CHILD = """
import json, time
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama
t_transformers = time.perf_counter()
import llmserve_nb.server.app
t_app = time.perf_counter()
from llmserve_nb.config import EngineConfig
from llmserve_nb.engine import GenerationRequest, load_engine
from llmserve_nb.engine.loading import local_model_dir
cfg = EngineConfig(cache_dir={cache!r})
local = local_model_dir(cfg)  # a miss converts here; a hit only finds the directory
t_tok = time.perf_counter()
AutoTokenizer.from_pretrained(local)
tokenizer_s = time.perf_counter() - t_tok
t_load = time.perf_counter()
e = load_engine(cfg)
t_loaded = time.perf_counter()
question = [{{"role": "user", "content": "What is the capital of France?"}}]
text = e.generate([GenerationRequest(messages=question, max_tokens=16)])[0].text
print(json.dumps({{"cache": e.load_timings["cache"], "torch_s": t_torch - t0,
                  "transformers_s": t_transformers - t_torch,
                  "app_import_s": t_app - t_transformers, "convert_s": t_tok - t_app, "tokenizer_s": tokenizer_s,
                  "load_s": e.load_timings["total_load_s"], "pack_s": e.load_timings.get("cpu_linear_pack_s", 0.0),
                  "to_ready_s": t_loaded - t0 - tokenizer_s, "first_answer_s": time.perf_counter() - t0 - tokenizer_s,
                  "answer": text}}))
"""


def run(cache: str | None) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(cache=cache)], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def engine_only(repeats: int, cached_only: bool) -> None:
    rows = []
    for _ in range(repeats):
        if cached_only:  # the user's cache, converted already (what every deploy after the first loads)
            rows.append(("cached safetensors (hit)", run(None)))
            continue
        with tempfile.TemporaryDirectory() as cache:
            rows.append(("GGUF (cache miss: dequantise + write safetensors)", run(cache)))
            rows.append(("cached safetensors (hit)", run(cache)))
    print("| load path | import torch s | import transformers s | import server.app s | tokenizer s | engine load s "
          "(of it prepack) | process to ready s | first answer s | answer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['torch_s']:.2f} | {r['transformers_s']:.2f} | {r['app_import_s']:.2f} | "
              f"{r['tokenizer_s']:.2f} | {r['load_s']:.2f} ({r['pack_s']:.2f}) | {r['to_ready_s']:.1f} | "
              f"{r['first_answer_s']:.1f} | {r['answer'][:40]} |")
    miss = [r["load_s"] for label, r in rows if r["cache"] == "miss"]
    hit = [r["load_s"] for label, r in rows if r["cache"] == "hit"]
    if not miss:
        return
    print(f"\nengine load, GGUF / cached: {sum(miss) / len(miss):.1f} s / {sum(hit) / len(hit):.1f} s "
          f"= {sum(miss) / sum(hit) * len(hit) / len(miss):.1f}x")


# ---- served ------------------------------------------------------------------------------------
_LOG_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def log_events(path: Path, since: float) -> list[tuple[float, str]]:
    """(time, message) of each line of a Serve log written at or after `since` (Serve stamps local time, ms)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if m := _LOG_LINE.match(line):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t >= since - 0.002:
                events.append((t, m.group(2)))
    return events


def first(events: list[tuple[float, str]], needle: str) -> float | None:
    return next((t for t, msg in events if needle in msg), None)


def process_start(pid: int) -> float | None:
    """When process `pid` was created (wall clock), from /proc; None once it is gone."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


OVERRIDES_ENV = "COLD_START_APP_OVERRIDES"  # a variant's `set:` parts, as JSON, for its child


def served_deploy(cluster, logs: Path, name: str) -> dict[str, float | str | None]:
    """Deploy the default app as `name`, wait for it as `cluster.deploy` does, and read back the timeline."""
    from llmserve_nb import AppConfig

    seen: dict[str, float] = {}

    def progress(line: str) -> None:
        status = line.split(": ", 1)[1].split(":")[0]
        seen.setdefault(status, time.time())

    t0 = time.time()
    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "{}"))
    handle = cluster.deploy(AppConfig(name=name, route_prefix=f"/{name}").with_overrides(**overrides), wait=False)
    t_put = time.time()
    handle.wait_running(timeout_s=600, progress=progress)
    t_ready = time.time()
    engine = handle.stats()["engine"]
    serve_logs = logs / "serve"
    # A replica's log reaches its file a moment after the controller's: wait for the line that ends its part.
    deadline = time.time() + 10
    while True:
        replica = [e for p in serve_logs.glob(f"replica_{name}_LLMServer_*.log") for e in log_events(p, t0)]
        if first(replica, "Finished initializing replica") or time.time() > deadline:
            break
        time.sleep(0.2)
    controller = sorted(
        (e for p in serve_logs.glob("controller_[0-9]*.log") for e in log_events(p, t0)), key=lambda e: e[0])
    build = [e for p in serve_logs.glob(f"controller_build_{name}_*.log") for e in log_events(p, t0)]
    started = next((msg for _, msg in controller if "started successfully" in msg and f"app='{name}'" in msg), "")
    pid = re.search(r"PID: (\d+)", started)
    row = {
        "t0": t0, "put_done": t_put,
        "controller_start": first(controller, "Controller starting"),
        "app_received": first(controller, f"Deploying new app '{name}'"),
        "build_start": first(controller, f"Importing and building app '{name}'"),
        "build_worker_up": first(build, "Importing application"),
        "build_done": first(controller, f"Imported and built app '{name}'"),
        "replica_start": first(controller, f"Starting Replica(id="),
        "replica_process": process_start(int(pid.group(1))) if pid else None,
        "init_start": first(replica, "Started initializing replica"),
        "init_done": first(replica, "Finished initializing replica"),
        "replica_running": first(controller, "started successfully"),
        "client_running": seen.get("RUNNING"), "ready": t_ready,
        "engine_load_s": engine.get("total_load_s"), "pack_s": engine.get("cpu_linear_pack_s", 0.0),
        "controller_line": started,
    }
    handle.shutdown()
    return row


def _span(row: dict, a: str, b: str) -> str:
    return "?" if row.get(a) is None or row.get(b) is None else f"{row[b] - row[a]:.2f}"


SPANS = [
    ("PUT /api/serve/applications/ (starts Serve's controller and proxy the first time)", "t0", "put_done"),
    ("controller: PUT sent → app received", "t0", "app_received"),
    ("build task: worker up (controller asked → its first log line)", "build_start", "build_worker_up"),
    ("build task: import the app + build it", "build_worker_up", "build_done"),
    ("controller: built → replica actor asked for", "build_done", "replica_start"),
    ("replica worker process created, after the ask (<0: prestarted)", "replica_start", "replica_process"),
    ("replica: asked → constructor called (worker boot unless prestarted, imports)", "replica_start", "init_start"),
    ("replica: constructor (engine load, tokenizer, prepack, metrics)", "init_start", "init_done"),
    ("Serve: constructor done → replica RUNNING (reconfigure, health check, control loop)", "init_done",
     "replica_running"),
    ("client: replica RUNNING → client sees app RUNNING (status poll)", "replica_running", "client_running"),
    ("client: RUNNING → /health answers through the proxy (route probe)", "client_running", "ready"),
    ("**deploy call → ready (what deploy(wait=True) takes)**", "t0", "ready"),
]


def served_rows(deploys: int) -> dict:
    import ray

    import llmserve_nb

    t = time.time()
    cluster = llmserve_nb.connect()
    connect_s = time.time() - t
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    try:
        rows = [served_deploy(cluster, logs, f"cold{i}") for i in range(deploys)]
    finally:
        cluster.shutdown()
    return {"connect_s": connect_s, "rows": rows}


def print_served(columns: list[tuple[str, dict]]) -> None:
    """One column per (variant, deploy)."""
    heads = [(label, i, r) for label, run in columns for i, r in enumerate(run["rows"])]
    print("| span | " + " | ".join(f"{label}, deploy {i + 1} s" for label, i, _ in heads) + " |")
    print("|---|" + "---|" * len(heads))
    print("| connect() (embedded Ray; before the deploy call, not in it) | "
          + " | ".join(f"{run['connect_s']:.2f}" if i == 0 else "" for label, run in columns
                       for i, _ in enumerate(run["rows"])) + " |")
    for label, a, b in SPANS:
        print(f"| {label} | " + " | ".join(_span(r, a, b) for _, _, r in heads) + " |")
    print("| of the constructor: engine load (tokenizer + weights + prepack) | "
          + " | ".join(f"{r['engine_load_s']:.2f}" for _, _, r in heads) + " |")
    print("| of the engine load: oneDNN prepacking | " + " | ".join(f"{r['pack_s']:.2f}" for _, _, r in heads) + " |")
    for label, i, r in heads:
        print(f"\n{label}, deploy {i + 1}: {r['controller_line']}")


def variant_env(spec: str, scratch: Path) -> dict[str, str]:
    """The environment of a variant run: `base` (as installed), `block:MODULE` (MODULE unimportable, as if not
    installed: every Ray worker the embedded cluster starts inherits PYTHONPATH), `patch:PATH=FILE` (this
    package with the file at PATH, relative to the repository, replaced by FILE), `set:PATH=VALUE` (the app
    deployed with that `AppConfig` override, VALUE a string), joined with '+'."""
    env = dict(os.environ)
    paths = []
    overrides = {}
    for part in spec.split("+"):
        kind, _, arg = part.partition(":")
        if kind == "base":
            continue
        if kind == "block":
            stub = scratch / f"block-{arg}" / arg
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "__init__.py").write_text(f"raise ImportError('{arg} blocked by benchmarks/cold_start.py')\n")
            paths.append(str(stub.parent))
        elif kind == "patch":
            rel, _, replacement = arg.partition("=")
            tree = scratch / f"patch-{len(paths)}"
            shutil.copytree(Path(__file__).resolve().parent.parent / "llmserve_nb", tree / "llmserve_nb")
            shutil.copyfile(replacement, tree / rel)
            paths.append(str(tree))
        elif kind == "set":
            path, _, value = arg.partition("=")
            overrides[path] = value
        else:
            raise SystemExit(f"variant {spec!r}: use base, block:MODULE, patch:PATH=FILE or set:PATH=VALUE, "
                             "joined with '+'")
    env[OVERRIDES_ENV] = json.dumps(overrides)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def served(deploys: int, variants: list[str]) -> None:
    """Each variant on its own fresh embedded Ray, in a child process, one after the other."""
    columns = []
    with tempfile.TemporaryDirectory() as scratch:
        for spec in variants:
            child = [sys.executable, str(Path(__file__).resolve()), "--served-child", "--deploys", str(deploys)]
            # From "/", so that only PYTHONPATH and the installed package decide what this package is.
            out = subprocess.run(child, env=variant_env(spec, Path(scratch)), capture_output=True, text=True, cwd="/")
            if out.returncode:
                raise SystemExit(f"variant {spec} failed:\n{out.stderr[-3000:]}")
            columns.append((spec, json.loads(out.stdout.strip().splitlines()[-1])))
    print_served(columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="engine-only mode: load pairs (miss, hit)")
    ap.add_argument("--cached-only", action="store_true", help="engine-only mode: only loads from the user's cache")
    ap.add_argument("--served", action="store_true", help="deploy the default app on an embedded Ray instead")
    ap.add_argument("--deploys", type=int, default=2, help="--served: deploys on the same cluster")
    ap.add_argument("--variants", default="base", help="--served: comma-separated, e.g. "
                    "base,block:rfc3987_syntax,patch:llmserve_nb/engine/__init__.py=FILE (see variant_env)")
    ap.add_argument("--served-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.served_child:
        print(json.dumps(served_rows(args.deploys)))
    elif args.served:
        served(args.deploys, args.variants.split(","))
    else:
        engine_only(args.repeats, args.cached_only)


if __name__ == "__main__":
    main()
