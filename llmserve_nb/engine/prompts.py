"""Prompts as token ids and outputs as text: the tokenizer's side of an engine, apart from the model, so
that a front end that only tokenizes and detokenizes (`core_client`) needs no model to do it."""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Callable

from llmserve_nb.engine.detokenizer import OutputText
from llmserve_nb.engine.protocol import GenerationRequest, PreparedRequest, new_request_id

__all__ = ["Prompts", "prepare_on"]


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
