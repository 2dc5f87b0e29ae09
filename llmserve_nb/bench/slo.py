"""Service-level objectives per request, and goodput: the requests (and their tokens) that met them.

A request is *good* when it completed (status "ok") and meets every bound that is set: this is vLLM's
`--goodput` and GuideLLM's definition. A run meets its SLO when the share of good requests is at least
`SLO.attainment`. See the package docstring for the denominator of that share.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_KEYS = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_s", "e2e": "e2e_s", "attainment": "attainment"}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SLO:
    """Per-request latency bounds in seconds (None = not bounded) and the share of requests that must meet them.

    - `ttft_s`: time to first token.
    - `tpot_s`: time per output token after the first, `(e2e - TTFT) / (output_tokens - 1)`. Where it is
      undefined (one output token, or a server that does not stream) the bound does not apply, as vLLM
      counts such a request's TPOT as 0; the TTFT and e2e bounds still do.
    - `itl_s`: every gap between successive text chunks of the request (its worst stall) is at most this.
    - `e2e_s`: end-to-end latency.
    - `attainment`: the share of requests (0 < a <= 1) that must be good for a run to meet the SLO.
    """

    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    attainment: float = 0.99

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ValueError(f"SLO {name} must be a positive number of seconds or None, got {v!r}")
        a = self.attainment
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1:
            raise ValueError(f"SLO attainment must be in (0, 1] (0.99 = 99 %), got {a!r}")

    @classmethod
    def parse(cls, spec: str) -> SLO:
        """From text such as "ttft=1s,tpot=100ms,e2e=10s,attainment=99%".

        Keys: ttft, tpot, itl, e2e (a number with unit s, ms or us; a bare number is seconds) and
        attainment (a fraction such as 0.99, or a percentage such as 99%). Commas or spaces separate them.
        """
        kw: dict[str, float] = {}
        parts = [p for p in re.split(r"[,\s]+", spec.strip()) if p]
        if not parts:
            raise ValueError("empty SLO: give e.g. 'ttft=1s,tpot=100ms' (keys: ttft, tpot, itl, e2e, attainment)")
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ValueError(f"SLO term {part!r} is not key=value (e.g. ttft=1s)")
            if key not in _KEYS:
                raise ValueError(f"unknown SLO key {key!r} in {part!r}; known: {', '.join(_KEYS)}")
            if _KEYS[key] in kw:
                raise ValueError(f"SLO key {key!r} given twice")
            m = _NUMBER.match(value)
            if value.strip().startswith("-"):
                raise ValueError(f"SLO {key} must not be negative, got {value!r}")
            if not m:
                raise ValueError(f"SLO {key}={value!r} is not a number with a unit (e.g. 1s, 100ms, 99%)")
            number, unit = float(m.group(1)), m.group(2).lower()
            if key == "attainment":
                if unit not in ("", "%"):
                    raise ValueError(f"SLO attainment takes a fraction (0.99) or a percentage (99%), got {value!r}")
                kw["attainment"] = number / 100 if unit == "%" else number
            else:
                if unit not in ("",) + tuple(_UNITS):
                    raise ValueError(f"SLO {key}={value!r}: unknown unit {unit!r}; use s, ms or us")
                kw[_KEYS[key]] = number * _UNITS.get(unit, 1.0)
        return cls(**kw)

    def __str__(self) -> str:
        """The `parse` form, e.g. "ttft=1000ms,tpot=100ms,attainment=99%"."""
        terms = [f"{key}={getattr(self, name) * 1000:g}ms" for key, name in _KEYS.items()
                 if name != "attainment" and getattr(self, name) is not None]
        return ",".join(terms + [f"attainment={self.attainment * 100:g}%"])

    @property
    def bounds(self) -> dict[str, float]:
        """The bounds that are set, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "attainment" and getattr(self, f.name) is not None}

    def good(self, result: Any) -> bool:
        """Whether one request (a `RequestResult`: results.py imports this module) completed and met every bound set."""
        if result.status != "ok":
            return False
        if self.ttft_s is not None and not result.ttft_s <= self.ttft_s:
            return False
        if self.e2e_s is not None and not result.e2e_s <= self.e2e_s:
            return False
        tpot = result.tpot_s
        if self.tpot_s is not None and not math.isnan(tpot) and tpot > self.tpot_s:
            return False
        return self.itl_s is None or all(gap <= self.itl_s for gap in result.itl_s)
