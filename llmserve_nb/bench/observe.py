"""Run a load and watch the app while it runs: the one harness behind every experiment.

`run_observed(load, samplers, actions)` runs `load` (a blocking call, usually a `run_benchmark`) on a
background thread and, on the calling thread, polls every sampler each `every_s` seconds (replica counts,
the engine's batch, a metrics endpoint) and fires each action once at its offset (kill a replica, push an
update, shift traffic). The answer is a `Timeline`: the load's result, every sample and every action with
its time. Reliability, autoscaling, cluster autoscaling, rollout and the tuner's load button all use it,
so they agree on what "t = 12 s" means.

A caller that must react to the samples while the run goes on (wait until a node joined, then scale
down) passes its own `Timeline` and, from the load's thread, `mark`s what it did and `wait_for`s what it
expects.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

__all__ = ["Action", "Event", "Timeline", "run_observed"]

T = TypeVar("T")


@dataclass(frozen=True)
class Action:
    """`fn()` is called once, `at_s` seconds after the load started, on its own thread (so a long action,
    such as killing a replica and waiting for its replacement, does not stop the sampling)."""

    at_s: float
    name: str
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Event:
    t_s: float  # when the action fired (or the mark was made)
    name: str
    value: Any = None  # what the action returned
    error: BaseException | None = None
    ended_s: float | None = None  # when the action returned; None for a mark


@dataclass
class Timeline(Generic[T]):
    """Times are seconds since `t0` (a `time.monotonic()` reading: when the timeline was made)."""

    result: T | None = None
    samples: dict[str, list[tuple[float, Any]]] = field(default_factory=dict)
    sample_errors: dict[str, list[tuple[float, BaseException]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    duration_s: float = 0.0
    ended: bool = False  # the run is over: no sample will come any more
    load_ended_s: float | None = None  # when the load returned (or raised), for telling samples before it from after
    t0: float = field(default_factory=time.monotonic, repr=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False, compare=False)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def series(self, name: str) -> list[tuple[float, Any]]:
        return list(self.samples.get(name, []))

    def values(self, name: str) -> list[Any]:
        return [v for _, v in self.samples.get(name, [])]

    def first(self, name: str, pred: Callable[[Any], bool]) -> float | None:
        """When a sample of `name` first satisfied `pred` (seconds from the start), or None."""
        return next((t for t, v in self.samples.get(name, []) if pred(v)), None)

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)

    def mark(self, name: str, value: Any = None) -> Event:
        """Record that something happened now (a step the caller took), next to the actions' events."""
        event = Event(round(self.now(), 3), name, value)
        self._add_event(event)
        return event

    def wait_for(self, name: str, pred: Callable[[Any], bool], *, since_s: float = 0.0,
                 timeout_s: float) -> tuple[float, Any]:
        """The first sample of `name` taken at or after `since_s` that satisfies `pred`, as (time, value);
        it may already be there. Waits for new samples up to `timeout_s`: TimeoutError then, LookupError
        if the run ended without one."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                hit = next(((t, v) for t, v in self.samples.get(name, []) if t >= since_s and pred(v)), None)
                if hit is not None:
                    return hit
                last = self.samples.get(name, [])[-1:] or "no sample"
                if self.ended:
                    raise LookupError(f"the run ended without a sample of {name!r} that matched (last: {last})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no sample of {name!r} matched within {timeout_s:g}s (last: {last})")
                self._changed.wait(left)

    def shifted(self, by_s: float) -> Timeline[T]:
        """The same timeline on a clock that starts `by_s` seconds later (e.g. at the load's first request)."""
        def move(rows: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
            return [(round(t - by_s, 3), v) for t, v in rows]

        return Timeline(
            result=self.result,
            samples={n: move(rows) for n, rows in self.samples.items()},
            sample_errors={n: move(rows) for n, rows in self.sample_errors.items()},
            events=[Event(round(e.t_s - by_s, 3), e.name, e.value, e.error,
                          None if e.ended_s is None else round(e.ended_s - by_s, 3)) for e in self.events],
            duration_s=self.duration_s, ended=self.ended, t0=self.t0 + by_s,
        )

    def _add_sample(self, name: str, t: float, value: Any) -> None:
        with self._changed:
            self.samples.setdefault(name, []).append((t, value))
            self._changed.notify_all()

    def _add_event(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self.events.sort(key=lambda e: e.t_s)
            self._changed.notify_all()

    def _end(self, duration_s: float) -> None:
        with self._changed:
            self.duration_s = duration_s
            self.ended = True
            self._changed.notify_all()


def run_observed(
    load: Callable[[], T] | None,
    samplers: Mapping[str, Callable[[], Any]] | None = None,
    actions: Sequence[Action] = (),
    *,
    every_s: float = 1.0,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    on_sample: Callable[[Timeline[T]], None] | None = None,
    timeline: Timeline[T] | None = None,
) -> Timeline[T]:
    """Run `load` while sampling and acting; see the module docstring.

    Ends when the load returns and every action that fired has returned (after one last sample), or,
    without a load, after `duration_s`; `stop` ends it at the next tick (the load thread is then left to
    finish on its own). Actions still due when the load ended are not fired. A sampler that raises
    records the error under `sample_errors` and sampling goes on; an action that raises is an `Event`
    with its error. An exception of the load itself is re-raised here, after the timeline is complete.
    `timeline` (default: a new one, started now) is the one to fill, for a load that watches it.
    """
    if load is None and duration_s is None:
        raise ValueError("run_observed needs a load or a duration_s")
    samplers = dict(samplers or {})
    pending = sorted(actions, key=lambda a: a.at_s)
    timeline = timeline if timeline is not None else Timeline()
    for name in samplers:
        timeline.samples.setdefault(name, [])
    failure: list[BaseException] = []
    load_done = threading.Event()
    changed = threading.Event()  # the load or an action ended: look again before the next tick
    fired: list[threading.Thread] = []

    def run_load() -> None:
        try:
            timeline.result = load()  # type: ignore[misc]
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)
        finally:
            timeline.load_ended_s = round(timeline.now(), 3)
            load_done.set()
            changed.set()

    def fire(action: Action, at: float) -> None:
        try:
            value, error = action.fn(), None
        except Exception as e:  # recorded; the caller decides what a failed action means
            value, error = None, e
        timeline._add_event(Event(at, action.name, value, error, ended_s=round(timeline.now(), 3)))
        changed.set()

    if load is not None:
        threading.Thread(target=run_load, name="observed-load", daemon=True).start()

    def sample() -> None:
        t = round(timeline.now(), 3)
        for name, fn in samplers.items():
            try:
                timeline._add_sample(name, t, fn())
            except Exception as e:
                timeline.sample_errors.setdefault(name, []).append((t, e))
        if on_sample is not None:
            on_sample(timeline)

    while True:
        now = timeline.now()
        while pending and pending[0].at_s <= now:
            action = pending.pop(0)
            thread = threading.Thread(target=fire, args=(action, round(now, 3)), name=f"observed-{action.name}",
                                      daemon=True)
            thread.start()
            fired.append(thread)
        # Read before sampling, so the last sample is taken after the load (and its actions) ended.
        over = load_done.is_set() if load is not None else now >= (duration_s or 0.0)
        finished = over and not any(t.is_alive() for t in fired)
        sample()
        if finished or (stop is not None and stop.is_set()):
            break
        if over:
            pending.clear()
        wake = every_s if not pending else min(every_s, max(pending[0].at_s - timeline.now(), 0.0))
        if load is None and stop is not None and not fired:
            stop.wait(wake)
        else:
            changed.wait(wake)
            changed.clear()
    timeline._end(round(timeline.now(), 3))
    if failure:
        raise failure[0]
    return timeline
