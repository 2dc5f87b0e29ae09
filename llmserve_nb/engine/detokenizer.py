"""Incremental detokenization with stop strings: linear in the output, never leaking a stop string
or half a UTF-8 character into the stream."""
from __future__ import annotations

from llmserve_nb.engine.protocol import FinishReason, GenerationRequest, GenerationResult

__all__ = ["OutputText"]


class OutputText:
    """One request's output: token ids, text, stop and EOS handling.

    `tokenizers.decoders.DecodeStream` turns each new id into the text it completes (None while a
    multi-byte character is unfinished), so a token costs O(1) instead of re-decoding every id.
    Text that could still grow into a stop string is held back until it cannot.
    """

    def __init__(self, request: GenerationRequest, prompt_tokens: int, tokenizer, eos_ids: set[int]):
        from tokenizers.decoders import DecodeStream

        self.request = request
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False
        self.finish_reason: FinishReason = "length"
        self._tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)  # the Rust tokenizer DecodeStream takes
        self._eos_ids = eos_ids
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text that is now safe to stream."""
        req = self.request
        if token_id in self._eos_ids and not req.ignore_eos:
            return self._finish("stop", len(self.text))
        self.ids.append(token_id)
        piece = self._stream.step(self._tokenizer, token_id)
        if piece:
            start = len(self.text)
            self.text += piece
            for s in req.stop:
                at = self.text.find(s, max(0, start - len(s) + 1))
                if at != -1:
                    self.text = self.text[:at]
                    return self._finish("stop", at)
        if len(self.ids) >= req.max_tokens:
            return self._finish("length", len(self.text))
        safe = len(self.text)
        for s in req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._flush(safe)

    def abort(self) -> str:
        """End early (the client went away); the held-back text is released."""
        return self.end("abort")

    def end(self, reason: FinishReason) -> str:
        """End for a reason the text did not see (an engine core that ended the row); the held-back text
        is released."""
        return self._finish(reason, len(self.text))

    def _finish(self, reason: FinishReason, upto: int) -> str:
        self.done, self.finish_reason = True, reason
        return self._flush(upto)

    def _flush(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(self.text, self.prompt_tokens, len(self.ids), self.finish_reason)
