"""Prompts as token ids and outputs as text: the tokenizer's side of an engine, apart from the model, so
that a front end that only tokenizes and detokenizes (`core_client`) needs no model to do it."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable

from llmserve_nb.engine.detokenizer import OutputText
from llmserve_nb.engine.protocol import GenerationRequest, PreparedRequest, new_request_id

__all__ = ["FileTokenizer", "Prompts", "load_tokenizer", "prepare_on"]

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class FileTokenizer:
    """A saved fast tokenizer read without transformers' tokenizer classes, which import torch (seconds of CPU
    that a front end, competing with its engine core's own start-up for the same cores, need not spend):
    `tokenizer.json` through `tokenizers`, the chat template rendered by transformers' torch-free renderer
    with the special tokens `apply_chat_template` passes. The part of the tokenizer interface `Prompts` and
    `OutputText` use."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        d = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
        template = d / "chat_template.jinja"
        self.chat_template: str | None = template.read_text() if template.is_file() else config.get("chat_template")
        self._special = {k: v["content"] if isinstance(v, dict) else v for k in _SPECIAL_TOKENS
                         if (v := config.get(k)) is not None}
        if self.chat_template:  # its renderer's imports (a second) now, beside the core's, not on a first request
            import transformers.utils.chat_template_utils  # noqa: F401

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False
                            ) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        assert not tokenize, "tokenize the rendered text with __call__"
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self._special)
        return rendered[0]


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """`FileTokenizer` where `source` is a directory holding a fast tokenizer's files (the embedded model's
    converted copy, a local path), else transformers' `AutoTokenizer` (a hub id, a slow or remote-code one)."""
    if (Path(source) / "tokenizer.json").is_file() and not trust_remote_code:
        return FileTokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


async def prepare_on(executor: Executor, prompt_ids: Callable[[GenerationRequest], list[int]],
                     request: GenerationRequest, request_id: str | None) -> PreparedRequest:
    """`Engine.prepare`'s work, off the event loop: tokenizing a long prompt takes milliseconds."""
    ids = await asyncio.get_running_loop().run_in_executor(executor, prompt_ids, request)
    return PreparedRequest(request, ids, request_id or new_request_id())


class Prompts:
    def __init__(self, tokenizer, model_name: str, max_model_len: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (chat template applied for messages), checked: not empty
        and within the context length. ValueError says what is wrong."""
        if req.messages is not None:
            if not self.tokenizer.chat_template:
                raise ValueError(f"{self.model_name} has no chat template; use /v1/completions with a prompt")
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(req.prompt)["input_ids"]
        if not ids:
            # An empty sequence has no position to predict from; refused here rather than failing a batch.
            raise ValueError("the prompt is empty (0 tokens); send at least one token of text")
        if len(ids) + req.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context length "
                f"max_model_len ({self.max_model_len}); shorten the prompt or lower max_tokens"
            )
        return ids

    def new_output(self, req: GenerationRequest, prompt_tokens: int) -> OutputText:
        return OutputText(req, prompt_tokens, self.tokenizer, self.eos_ids)
