"""How often a client re-reads state that changes on the cluster's side (an app's status, a route's answer).

A deploy's wait ends on a transition nobody pushes to us, so its latency is the poll interval's
(half of it on average) on top of the transition itself. A fixed 1 s poll added about 0.5 s to
every deploy and the route probe another 0.25 s; polling fast throughout would instead make the
dashboard and Serve's controller answer many requests on the same cores the starting replica
loads its model on. So the interval starts short, grows geometrically to a cap, and is short
again after each change seen: the next transition often follows a change soon (a replica that
started is RUNNING a control-loop tick later; a RUNNING app's route answers within moments).
"""
from __future__ import annotations

import time
from typing import Callable, Hashable

__all__ = ["Poll"]


class Poll:
    """Delays between reads of a changing state: `first_s`, then each `factor` times the last, at most
    `most_s`; back to `first_s` whenever `seen()` gets a state other than the previous one.

    `sleep` is what waits (tests pass a recorder)."""

    def __init__(self, first_s: float = 0.05, most_s: float = 0.5, factor: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep):
        if not 0 < first_s <= most_s or factor < 1:
            raise ValueError(f"need 0 < first_s <= most_s and factor >= 1, got {first_s}, {most_s}, {factor}")
        self.first_s, self.most_s, self.factor = first_s, most_s, factor
        self._sleep = sleep
        self._next_s = first_s
        self._last: Hashable = object()

    def seen(self, state: Hashable) -> None:
        """Record what the last read found: a change makes the next delay short again."""
        if state != self._last:
            self._last = state
            self._next_s = self.first_s

    def wait(self, at_most_s: float | None = None) -> None:
        """Sleep the next delay (no longer than `at_most_s`, e.g. what is left of a deadline)."""
        delay = self._next_s if at_most_s is None else max(0.0, min(self._next_s, at_most_s))
        self._next_s = min(self._next_s * self.factor, self.most_s)
        self._sleep(delay)
