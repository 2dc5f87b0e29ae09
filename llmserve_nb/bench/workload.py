"""What to send: seeded prompts, per-request lengths, and which streaming clients hang up early."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal, Sequence

# Each word is one token (with its leading space) in SmolLM2's tokenizer and the prefix "Story:" is
# two, so a prompt of N tokens is exact for the embedded model and close for other BPE tokenizers.
_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but first one their its new after who they have been also other two more time years city world people "
    "made state year used during part until there most many school known three water river house music family "
    "name team early work film game life second later day north south east west found war small since best town "
    "great high book light road park green blue black white red old long big good place home land sea stone tree "
    "bird fish horse field story song king queen garden window door table chair paper letter morning evening "
    "night summer winter spring autumn rain snow wind cloud star moon sun mountain valley island forest lake "
    "bridge street market village church castle ship train car plane friend child mother father brother sister "
    "teacher doctor farmer soldier artist writer painter singer dancer player student worker leader member group "
    "power energy money price value number line point order form change model system process level area"
).split()
_PROMPT_PREFIX, _PROMPT_PREFIX_TOKENS = "Story:", 2
# Drop decisions use their own stream of random numbers, so turning drops on leaves prompts and lengths alone.
_DROP_SEED_SALT = 7919
# Shared prefixes and which request gets which are seeded by strings (hashed the same in every process),
# apart from the integer seeds of the prompts, so a prefix workload leaves the other draws as they were.
_PREFIX_SEED = "llmserve-nb prefix {seed} {j}"
_PREFIX_ORDER_SEED = "llmserve-nb prefix order {seed}"

Length = int | tuple[int, int]
Distribution = Literal["uniform", "loguniform"]


def make_prompts(n: int, input_tokens: Length = 30, seed: int = 0) -> list[str]:
    """`n` deterministic prompts of `input_tokens` tokens (an int, or an inclusive (lo, hi) range)."""
    rng = random.Random(seed)
    return [_text(rng, _draw(rng, input_tokens)) for _ in range(n)]


def _words(rng: random.Random, k: int) -> str:
    """`k` words, each with its leading space: `k` tokens that join any text without merging into it."""
    return "".join(" " + rng.choice(_WORDS) for _ in range(k))


def _text(rng: random.Random, k: int) -> str:
    if k <= _PROMPT_PREFIX_TOKENS:
        return _words(rng, k).lstrip()
    return _PROMPT_PREFIX + _words(rng, k - _PROMPT_PREFIX_TOKENS)


def _draw(rng: random.Random, length: Length, dist: Distribution = "uniform") -> int:
    if isinstance(length, int):
        return length
    lo, hi = length
    if dist == "uniform":
        return rng.randint(lo, hi)
    # floor of a log-uniform draw on [lo, hi + 1): every integer in [lo, hi] is reachable, small ones more often.
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


@dataclass
class Workload:
    """What to send: the same Workload (same seed) yields the same prompts and lengths on every server.

    `input_tokens` / `output_tokens` are an int or an inclusive (lo, hi) range drawn per request;
    `output_dist` says how a range is drawn: "uniform", or "loguniform" (P(n <= x) grows with
    log x, so short answers are common and long ones still appear). `output_tokens` is sent as
    `max_tokens`; with `ignore_eos=False` a request may end earlier at EOS.
    `duration_s` bounds each run (one concurrency level or rate); `timeout_s` bounds each request.
    `endpoint` is "completions" (prompt = the text) or "chat" (one user message; the chat template
    adds its own tokens on top of `input_tokens`).
    `drop_fraction` of the streaming requests (chosen with the seed) hang up after
    `drop_after_chunks` text chunks (an int or a (lo, hi) range); they count as `dropped`.
    `shared_prefix_tokens` > 0 makes a prefix-repetition workload (vLLM's `prefix_repetition` dataset):
    `num_prefixes` seeded prefixes of that many tokens, each prompt one of them (every prefix used
    equally often, in a seeded order) followed by its own `input_tokens` of words, so a prompt is
    `shared_prefix_tokens + input_tokens` tokens long and a prefix cache can reuse the prefix.
    """

    num_requests: int = 32
    input_tokens: Length = 30
    output_tokens: Length = 64
    duration_s: float = 300.0
    timeout_s: float = 120.0
    endpoint: Literal["completions", "chat"] = "completions"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    output_dist: Distribution = "uniform"
    drop_fraction: float = 0.0
    drop_after_chunks: Length = 4
    shared_prefix_tokens: int = 0
    num_prefixes: int = 1

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be > 0")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")
        if self.output_dist not in ("uniform", "loguniform"):
            raise ValueError(f"output_dist must be 'uniform' or 'loguniform', got {self.output_dist!r}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        for name in ("input_tokens", "output_tokens", "drop_after_chunks"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                setattr(self, name, value)
            lo = value if isinstance(value, int) else value[0]
            if lo < 1 or (not isinstance(value, int) and value[1] < lo):
                raise ValueError(f"{name} must be >= 1 (and lo <= hi for a range), got {value}")
        if self.shared_prefix_tokens < 0 or self.num_prefixes < 1:
            raise ValueError(f"shared_prefix_tokens must be >= 0 and num_prefixes >= 1, got "
                             f"{self.shared_prefix_tokens} and {self.num_prefixes}")

    @property
    def path(self) -> str:
        return "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"

    def items(self) -> list[tuple[str, int, int]]:
        """(prompt, nominal input tokens, max_tokens) per request, deterministic in `seed`."""
        rng = random.Random(self.seed)
        ins = [_draw(rng, self.input_tokens) for _ in range(self.num_requests)]
        outs = [_draw(rng, self.output_tokens, self.output_dist) for _ in range(self.num_requests)]
        return list(zip(self.prompts(ins), [self.shared_prefix_tokens + k for k in ins], outs))

    def prompts(self, lengths: Sequence[int]) -> list[str]:
        """Prompt i has `lengths[i]` tokens of its own (after its shared prefix, if any), seeded by `seed` and i."""
        if not self.shared_prefix_tokens:
            return [make_prompts(1, k, seed=self.seed * 100003 + i)[0] for i, k in enumerate(lengths)]
        prefixes = [_text(random.Random(_PREFIX_SEED.format(seed=self.seed, j=j)), self.shared_prefix_tokens)
                    for j in range(self.num_prefixes)]
        ids = self.prefix_ids(len(lengths))
        return [prefixes[ids[i]] + _words(random.Random(self.seed * 100003 + i), k) for i, k in enumerate(lengths)]

    def prefix_ids(self, n: int | None = None) -> list[int] | None:
        """Which shared prefix each of `n` (default `num_requests`) requests starts with; None without prefixes."""
        if not self.shared_prefix_tokens:
            return None
        n = self.num_requests if n is None else n
        ids = [i % self.num_prefixes for i in range(n)]
        random.Random(_PREFIX_ORDER_SEED.format(seed=self.seed)).shuffle(ids)
        return ids

    def drops(self) -> list[int | None]:
        """Per request: after how many text chunks its client hangs up, or None (reads to the end)."""
        if not self.stream or self.drop_fraction == 0:
            return [None] * self.num_requests
        rng = random.Random(self.seed * 100003 + _DROP_SEED_SALT)
        return [_draw(rng, self.drop_after_chunks) if rng.random() < self.drop_fraction else None
                for _ in range(self.num_requests)]

    def body(self, prompt: str, max_tokens: int, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self.temperature, "stream": self.stream}
        if model:
            body["model"] = model
        if self.endpoint == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


def mixed_workload(num_requests: int = 64, output_tokens: tuple[int, int] = (16, 512), **kw: Any) -> Workload:
    """Realistic lengths: `max_tokens` log-uniform over `output_tokens` (default 16–512), EOS honoured.

    Over 16–512 about 21 % of requests ask for at most 32 tokens and the median asks for about 90;
    EOS makes some end sooner, so the actual lengths come from usage. Other `Workload` fields
    (seed, drop_fraction, ...) pass through `kw`.
    """
    return Workload(num_requests=num_requests, output_tokens=tuple(output_tokens),
                    **{"output_dist": "loguniform", "ignore_eos": False, **kw})
