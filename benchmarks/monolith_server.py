"""The "traditional monolith": one FastAPI/uvicorn process calling HF `generate` once per request.

No batching and no streaming: requests are served one at a time (a lock around `generate`, since
concurrent `generate` calls would only fight over the same cores), and `stream: true` is ignored:
the answer is always one JSON body. The load generator handles that (TTFT = e2e for this server).
It exposes the OpenAI subset the load generator drives: POST /v1/completions, GET /v1/models, /health.

    python benchmarks/monolith_server.py --port 8200 [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench_common import MODEL_NAME, ensure_model


class CompletionRequest(BaseModel):
    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    ignore_eos: bool = False
    stream: bool = False  # accepted, not honoured: see the module docstring
    stream_options: dict | None = None


def build_app(dtype: str = "float32", threads: int | None = None) -> FastAPI:
    if threads:
        torch.set_num_threads(threads)
    model_dir = ensure_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    lock = threading.Lock()
    app = FastAPI(title="monolith")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "monolith"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise HTTPException(400, "this server takes exactly one prompt per request")
        if not 1 <= req.max_tokens <= 2048:
            raise HTTPException(400, f"max_tokens must be in [1, 2048], got {req.max_tokens}")
        ids = tok(prompts[0], return_tensors="pt")
        gen = {"max_new_tokens": req.max_tokens, "pad_token_id": tok.eos_token_id}
        if req.ignore_eos:
            gen["min_new_tokens"] = req.max_tokens  # suppresses EOS until max_tokens, like vLLM's ignore_eos
        if req.temperature > 0:
            gen.update(do_sample=True, temperature=req.temperature)
        else:
            gen["do_sample"] = False
        with lock, torch.inference_mode():
            out = model.generate(**ids, **gen)
        new = out[0, ids["input_ids"].shape[1]:]
        n_in, n_out = int(ids["input_ids"].shape[1]), int(new.shape[0])
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True),
                         "finish_reason": "length" if n_out >= req.max_tokens else "stop"}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    uvicorn.run(build_app(args.dtype, args.threads), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
