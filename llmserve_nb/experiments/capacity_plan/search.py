"""The search: on one replica, the highest open-loop request rate each candidate config holds under the SLO.

`find_max_rate` is the search itself, on any `measure(rate) -> Probe` (tests give it a fake with a known knee):
a geometric ramp up from `start_rate` until a rate fails, then bisection (geometric) between the last rate
that held and the first that failed, until they are within `rel_tol` of each other or the budget is spent.
A rate *holds* when at least `SLO.attainment` of the requests sent at it were good.

`search_configs` runs it live, one candidate after the other on the same app: each candidate differs
only in knobs Serve changes in place (`batching.*`, `deployment.max_ongoing_requests`), so switching is
`AppHandle.update` (seconds) and no model reloads. Later candidates start at the best rate so far: one
that fails there cannot win and is dropped after a single window.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from llmserve_nb.backends import backend_for
from llmserve_nb.bench import BenchRun, Workload, run_benchmark

if TYPE_CHECKING:
    import pandas as pd

    from llmserve_nb.bench.slo import SLO
    from llmserve_nb.cluster import AppHandle
    from llmserve_nb.config import AppConfig

__all__ = ["LIVE_KNOBS", "ConfigTrial", "Probe", "RateSearch", "SearchResult", "candidate_grid", "drain_s",
           "find_max_rate", "measure_rate", "search_configs"]

# What a candidate may change: what Serve applies to running replicas (user_config, deployment options).
# engine.max_num_seqs is not here: it is a build argument of the replica (AppConfig.build_args), so a
# change reloads the model, although the engine itself could take it live (Engine.configure).
LIVE_KNOBS = ("batching.max_batch_size", "batching.batch_wait_timeout_s", "deployment.max_ongoing_requests")


@dataclass(frozen=True)
class Probe:
    """One open-loop window at `rate` req/s. `attainment`: good requests / requests *sent*. Unlike
    `BenchRun.goodput`, which leaves requests cut by the run's end out, they count here as not good: the
    drain after the window (`drain_s`) lasts as long as the e2e bound, so an unfinished request missed it."""

    rate: float
    requests: int
    good: int
    attainment: float
    met: bool  # attainment >= the SLO's
    e2e_mean_s: float  # mean e2e of completed requests: the W of Little's law
    e2e_p99_s: float = math.nan
    ttft_p99_s: float = math.nan
    errors: int = 0

    @property
    def goodput(self) -> float:
        """Good requests per second of offered load (rate x attainment): the y of the Pareto plot."""
        return self.rate * self.attainment

    @classmethod
    def from_run(cls, run: BenchRun, slo: SLO, sent: tuple[float, float] = (0.0, math.inf)) -> Probe:
        """The requests of `run` sent within `sent` (seconds from its start, both ends included). A Poisson
        schedule may send its last requests after the nominal window, into the drain, which would then cut
        them short: such requests are load, not judged."""
        lo, hi = sent
        results = [r for r in run.results if lo <= r.start_s <= hi]
        good = sum(slo.good(r) for r in results)
        n = len(results)
        s = dataclasses.replace(run, results=results).summary()
        attainment = good / n if n else 0.0
        return cls(rate=float(run.rate or 0.0), requests=n, good=good, attainment=attainment,
                   met=n > 0 and attainment >= slo.attainment, e2e_mean_s=s["e2e_ms_mean"] / 1000,
                   e2e_p99_s=s["e2e_ms_p99"] / 1000, ttft_p99_s=s["ttft_ms_p99"] / 1000, errors=s["errors"])


@dataclass
class RateSearch:
    """The probes of one search, in the order they ran. `max_rate`: the highest rate that held (0 if none).
    `stopped`: converged | budget | pruned (failed at the best rate of an earlier config) | none held."""

    max_rate: float
    probes: list[Probe]
    stopped: str


def find_max_rate(
    measure: Callable[[float], Probe],
    *,
    start_rate: float,
    growth: float = 2.0,
    rel_tol: float = 0.25,
    max_probes: int = 8,
    beat: float = 0.0,
    min_rate: float | None = None,
    deadline: float = math.inf,
    clock: Callable[[], float] = time.monotonic,
) -> RateSearch:
    """The highest rate at which `measure(rate).met`, to within `rel_tol` (relative).

    Ramp: from `start_rate` (or from `beat`, the best rate another config held) the rate is multiplied by
    `growth` while it holds, and divided by it while it fails and none has held yet, down to `min_rate`
    (default `start_rate / growth**3`). Then bisection at the geometric mean of the highest rate that held and
    the lowest that failed. No probe starts after `max_probes` or once `clock()` reached `deadline`. With
    `beat`, a failure at the first probe ends the search ("pruned"): this config cannot beat the other.
    """
    if not start_rate > 0 or not growth > 1 or not rel_tol > 0 or max_probes < 1:
        raise ValueError("need start_rate > 0, growth > 1, rel_tol > 0 and max_probes >= 1")
    floor = min_rate if min_rate is not None else start_rate / growth**3
    probes: list[Probe] = []
    lo, hi = 0.0, math.inf  # highest rate that held, lowest that failed

    def run(rate: float) -> None:
        nonlocal lo, hi
        p = measure(rate)
        probes.append(p)
        if p.met:
            lo = max(lo, rate)
        else:
            hi = min(hi, rate)

    def spent() -> bool:
        return len(probes) >= max_probes or clock() >= deadline

    rate = beat if beat > 0 else start_rate
    run(rate)
    if beat > 0 and not lo:
        return RateSearch(0.0, probes, "pruned")
    while not spent() and (hi == math.inf or not lo):  # the ramp: until one rate held and one failed
        rate = rate * growth if lo else rate / growth
        if rate < floor:
            return RateSearch(0.0, probes, "none held")
        run(rate)
    while lo and hi < math.inf and hi / lo > 1 + rel_tol and not spent():
        run(math.sqrt(lo * hi))
    converged = bool(lo) and hi < math.inf and hi / lo <= 1 + rel_tol
    return RateSearch(lo, probes, "converged" if converged else ("budget" if lo else "none held"))


# ---- live -------------------------------------------------------------------------------------------
def drain_s(slo: SLO, workload: Workload) -> float:
    """How long a window waits for its last requests after the last send: long enough for any request
    that can still be good (the e2e bound, or TTFT + TPOT x tokens), at most the workload's timeout."""
    most = workload.output_tokens if isinstance(workload.output_tokens, int) else workload.output_tokens[1]
    if slo.e2e_s is not None:
        bound = slo.e2e_s
    elif slo.ttft_s is not None and slo.tpot_s is not None:
        bound = slo.ttft_s + slo.tpot_s * max(most - 1, 0)
    else:
        bound = workload.timeout_s
    return min(bound, workload.timeout_s)


def _wait_idle(app: AppHandle, timeout_s: float) -> None:
    """Wait until the replica has no request left from the last window (cancelled streams end at the next
    decode step), so a window never inherits the backlog of the one before."""
    if not app.backend.replica_stats:  # a vLLM app has no /stats: its aborts are vLLM's own
        return
    deadline = time.monotonic() + timeout_s
    while True:
        stats = app.stats()
        busy = stats["requests_running"] + stats["requests_waiting"]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app.name}: {busy} request(s) still in the replica {timeout_s:g}s after the window")
        time.sleep(0.2)


def measure_rate(app: AppHandle, workload: Workload, slo: SLO, rate: float, *, window_s: float,
                 label: str = "probe", arrival: str = "poisson", burstiness: float = 1.0) -> Probe:
    """One window: `rate` req/s open loop for `window_s` seconds (plus the drain), on `app` as it runs."""
    wl = dataclasses.replace(workload, num_requests=max(1, math.ceil(rate * window_s)),
                             duration_s=window_s + drain_s(slo, workload))
    _wait_idle(app, workload.timeout_s)
    run = run_benchmark(app.base_url, wl, rate=rate, slo=slo, arrival=arrival, burstiness=burstiness,
                        model=app.model, label=label, progress=False, api_key=app.api_key)
    return Probe.from_run(run, slo, sent=(0.0, window_s))


@dataclass
class ConfigTrial:
    label: str
    overrides: dict[str, Any]
    config: AppConfig
    search: RateSearch

    @property
    def max_rate(self) -> float:
        return self.search.max_rate


@dataclass
class SearchResult:
    """Every trial of `search_configs`; `best` is the one that held the highest rate (the first on a tie)."""

    slo: SLO
    workload: Workload
    window_s: float
    trials: list[ConfigTrial] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def best(self) -> ConfigTrial:
        held = [t for t in self.trials if t.max_rate > 0]
        if not held:
            raise ValueError(f"no config held any rate under the SLO {self.slo}: loosen the SLO, lower start_rate "
                             "or shorten the requests")
        return max(held, key=lambda t: t.max_rate)  # max() keeps the first of equals

    def table(self) -> pd.DataFrame:
        """One row per probe: config, rate, requests, good, attainment, held, e2e, goodput."""
        import pandas as pd

        return pd.DataFrame([{"config": t.label, "rate": p.rate, "requests": p.requests, "good": p.good,
                              "attainment": round(p.attainment, 4), "held": p.met, "goodput": round(p.goodput, 3),
                              "e2e_mean_s": round(p.e2e_mean_s, 3), "e2e_p99_s": round(p.e2e_p99_s, 3),
                              "ttft_p99_s": round(p.ttft_p99_s, 3), "errors": p.errors}
                             for t in self.trials for p in t.search.probes])

    def to_dict(self) -> dict[str, Any]:
        return {"slo": str(self.slo), "window_s": self.window_s, "elapsed_s": round(self.elapsed_s, 1),
                "trials": [{"label": t.label, "overrides": t.overrides, "max_rate": t.max_rate,
                            "stopped": t.search.stopped, "probes": len(t.search.probes)} for t in self.trials],
                "probes": self.table().to_dict("records")}


def candidate_grid(batch_sizes: Sequence[int] = (), wait_timeouts_s: Sequence[float] = (),
                   max_ongoing: Sequence[int | None] = ()) -> list[dict[str, Any]]:
    """Every combination of the values given, as dotted overrides (an empty list leaves that knob as deployed)."""
    axes = [(k, list(v)) for k, v in zip(LIVE_KNOBS, (batch_sizes, wait_timeouts_s, max_ongoing)) if len(v)]
    grid: list[dict[str, Any]] = [{}]
    for key, values in axes:
        grid = [{**g, key: v} for g in grid for v in values]
    return grid


def _label(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "as deployed"


def _one_replica(config: AppConfig) -> AppConfig:
    # The search measures what one replica holds; the fixed count is rendered as pinned autoscaling, so
    # pinning a running autoscaled app to 1 changes it in place.
    return config.with_overrides(**{"deployment.autoscaling": None, "deployment.num_replicas": 1})


def search_configs(
    app: AppHandle,
    workload: Workload,
    slo: SLO,
    candidates: Sequence[Mapping[str, Any]] = ({},),
    *,
    window_s: float = 10.0,
    budget_s: float = 300.0,
    start_rate: float = 0.5,
    growth: float = 2.0,
    rel_tol: float = 0.25,
    max_probes: int = 8,
    arrival: str = "poisson",
    burstiness: float = 1.0,
    progress: bool = True,
) -> SearchResult:
    """`find_max_rate` for each candidate (dotted overrides of `LIVE_KNOBS`) on `app`, pinned to one replica.

    The time left is shared out evenly among the candidates still to run; a probe is never cut short, so the
    search may end up to one window (plus its drain) past `budget_s`. `progress` shows a bar over the
    candidates, its note the last probe. The app is left running the last candidate.
    """
    from tqdm.auto import tqdm

    base = _one_replica(app.config)
    configs = []
    for overrides in candidates:
        label = _label(overrides)
        unknown = set(overrides) - set(LIVE_KNOBS)
        if unknown:  # engine.*, resources: a new replica build, the model reloads
            raise ValueError(f"candidate {label!r}: {', '.join(sorted(unknown))} cannot change live (the replica would "
                             f"be rebuilt and reload the model); the search varies {', '.join(LIVE_KNOBS)}")
        config = base.with_overrides(**overrides)
        if config.batching != base.batching and not backend_for(base).live_batching:
            raise ValueError(f"candidate {label!r}: a {base.engine.backend} app cannot change batching live")
        configs.append((label, dict(overrides), config))
    if not configs:
        raise ValueError("search_configs needs at least one candidate ({} = the app as deployed)")
    result = SearchResult(slo, workload, window_s)
    t0 = time.monotonic()
    if app.config != base:
        app.update(base)
    # One request first: the first forward pass and connection set-up must not land in the first window.
    run_benchmark(app.base_url, dataclasses.replace(workload, num_requests=1), concurrency=1, model=app.model,
                  progress=False, api_key=app.api_key)
    bar = tqdm(total=len(configs), desc="capacity search", unit="config", disable=not progress)
    for i, (label, overrides, config) in enumerate(configs):
        if app.config != config:
            app.update(config)
        share = (budget_s - (time.monotonic() - t0)) / (len(configs) - i)
        beat = max((t.max_rate for t in result.trials), default=0.0)
        bar.set_description(f"capacity search: {label}")

        def measure(rate: float, label: str = label) -> Probe:
            probe = measure_rate(app, workload, slo, rate, window_s=window_s, label=label, arrival=arrival,
                                 burstiness=burstiness)
            bar.set_postfix_str(f"{rate:.2f} req/s: {probe.attainment:.0%} good", refresh=True)
            return probe

        search = find_max_rate(measure, start_rate=start_rate, growth=growth, rel_tol=rel_tol, max_probes=max_probes,
                               beat=beat, deadline=time.monotonic() + max(share, 0.0))
        result.trials.append(ConfigTrial(label, overrides, config, search))
        bar.update(1)
    bar.close()
    result.elapsed_s = time.monotonic() - t0
    return result
