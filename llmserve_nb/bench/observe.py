"""Run a load and watch the app while it runs: the one harness behind every experiment.

`run_observed(load, samplers, actions)` runs `load` (a blocking call, usually a `run_benchmark`) on a
background thread and, on the calling thread, polls every sampler each `every_s` seconds (replica counts,
the engine's batch, a metrics endpoint) and fires each action once at its offset (kill a replica, push an
update, shift traffic). The answer is a `Timeline`: the load's result, every sample and every action with
its time. Reliability, autoscaling, cluster autoscaling, rollout and the tuner's load button all use it,
so they agree on what "t = 12 s" means.
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
    """`fn()` is called once, `at_s` seconds after the load started."""

    at_s: float
    name: str
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Event:
    t_s: float
    name: str
    value: Any = None  # what the action returned
    error: BaseException | None = None


@dataclass
class Timeline(Generic[T]):
    result: T | None = None
    samples: dict[str, list[tuple[float, Any]]] = field(default_factory=dict)
    sample_errors: dict[str, list[tuple[float, BaseException]]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    duration_s: float = 0.0

    def series(self, name: str) -> list[tuple[float, Any]]:
        return list(self.samples.get(name, []))

    def values(self, name: str) -> list[Any]:
        return [v for _, v in self.samples.get(name, [])]

    def first(self, name: str, pred: Callable[[Any], bool]) -> float | None:
        """When a sample of `name` first satisfied `pred` (seconds from the start), or None."""
        return next((t for t, v in self.samples.get(name, []) if pred(v)), None)

    def event(self, name: str) -> Event | None:
        return next((e for e in self.events if e.name == name), None)


def run_observed(
    load: Callable[[], T] | None,
    samplers: Mapping[str, Callable[[], Any]] | None = None,
    actions: Sequence[Action] = (),
    *,
    every_s: float = 1.0,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    on_sample: Callable[[Timeline[T]], None] | None = None,
) -> Timeline[T]:
    """Run `load` while sampling and acting; see the module docstring.

    Ends when the load returns (after one last sample), or, without a load, after `duration_s`; `stop`
    ends it early (the load thread is then left to finish on its own). A sampler that raises records the
    error under `sample_errors` and sampling goes on; an action that raises is an `Event` with its error.
    An exception of the load itself is re-raised here, after the timeline is complete.
    """
    if load is None and duration_s is None:
        raise ValueError("run_observed needs a load or a duration_s")
    samplers = dict(samplers or {})
    pending = sorted(actions, key=lambda a: a.at_s)
    timeline: Timeline[T] = Timeline(samples={n: [] for n in samplers})
    failure: list[BaseException] = []
    done = threading.Event()

    def run_load() -> None:
        try:
            timeline.result = load()  # type: ignore[misc]
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)
        finally:
            done.set()

    t0 = time.monotonic()
    if load is not None:
        threading.Thread(target=run_load, name="observed-load", daemon=True).start()

    def sample() -> None:
        t = round(time.monotonic() - t0, 3)
        for name, fn in samplers.items():
            try:
                timeline.samples[name].append((t, fn()))
            except Exception as e:
                timeline.sample_errors.setdefault(name, []).append((t, e))
        if on_sample is not None:
            on_sample(timeline)

    while True:
        now = time.monotonic() - t0
        while pending and pending[0].at_s <= now:
            action = pending.pop(0)
            try:
                timeline.events.append(Event(round(now, 3), action.name, action.fn()))
            except Exception as e:
                timeline.events.append(Event(round(now, 3), action.name, error=e))
        # Read before sampling, so the last sample is taken after the load ended.
        finished = done.is_set() if load is not None else now >= (duration_s or 0.0)
        sample()
        if finished or (stop is not None and stop.is_set()):
            break
        wake = every_s if not pending else min(every_s, max(pending[0].at_s - (time.monotonic() - t0), 0.0))
        if load is not None:
            done.wait(wake)
        elif stop is not None:
            stop.wait(wake)
        else:
            threading.Event().wait(wake)
    timeline.duration_s = round(time.monotonic() - t0, 3)
    if failure:
        raise failure[0]
    return timeline
