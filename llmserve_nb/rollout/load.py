"""Closed-loop load through the public route with sticky sessions, recording which version answered.

`llmserve_nb.bench` measures one server; during a rollout we also need each request's session header
and the router's answer headers (`x-served-by`, `x-rollout-epoch`), and load that keeps running in
the background while the notebook shifts weights. Prompts and request bodies come from
`bench.Workload`, so the requests are the bench's; TTFT is defined as in the bench (first SSE chunk
carrying text), e2e to `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from llmserve_nb.bench import Event, Timeline, Workload, run_observed
from llmserve_nb.bench.client import sse_objects
from llmserve_nb.rollout.routing import EPOCH_HEADER, SERVED_BY_HEADER
from llmserve_nb.stats import percentile


@dataclass
class Sample:
    index: int
    session: str
    start_s: float
    end_s: float = math.nan
    ttft_s: float = math.nan
    status: str = "pending"  # ok | error | incomplete
    http_status: int | None = None
    version: str | None = None
    epoch: int | None = None
    error: str = ""


class TrafficLoad:
    """`concurrency` users in a closed loop against `url` (the public route), in a background thread.

    Each request carries `header: <session>`, the sessions drawn round-robin from `sessions` ids, so
    each session sends several requests over the run. Use as a context manager or `start()`/`stop()`;
    `mark(label)` records a point in time (e.g. each weight change) that `phases()` splits on.
    The run stops at `stop()`, after `max_requests`, or after `max_duration_s`, whichever comes first.

    The load runs under `llmserve_nb.bench.run_observed`: `timeline` holds the marks as events and the
    count of completed requests every `sample_every_s`, on the clock of the samples' `start_s`.
    """

    def __init__(self, url: str, workload: Workload | None = None, *, concurrency: int = 4, sessions: int = 16,
                 header: str = "X-Session-Id", api_key: str | None = None, max_requests: int = 100_000,
                 max_duration_s: float = 3600.0, session_prefix: str = "s", sample_every_s: float = 0.25):
        self.url = url.rstrip("/")
        self.workload = workload or Workload(num_requests=64, output_tokens=16)
        self.concurrency = concurrency
        self.session_ids = [f"{session_prefix}{i}" for i in range(sessions)]
        self.header = header
        self.api_key = api_key
        self.max_requests = max_requests
        self.max_duration_s = max_duration_s
        self.sample_every_s = sample_every_s
        self.samples: list[Sample] = []
        self.timeline: Timeline[None] = Timeline()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ---- control ---------------------------------------------------------------------------
    def start(self) -> TrafficLoad:
        if self._thread is not None:
            raise RuntimeError("this load already ran; make a new TrafficLoad")
        self.timeline = Timeline()
        self.mark("start")
        self._thread = threading.Thread(target=self._main, name="rollout-load", daemon=True)
        self._thread.start()
        return self

    def now(self) -> float:
        return self.timeline.now()

    def mark(self, label: str) -> None:
        self.timeline.mark(label)

    @property
    def markers(self) -> list[Event]:
        """The marks so far (`name` is the label), oldest first."""
        return list(self.timeline.events)

    def completed(self) -> int:
        return sum(s.status == "ok" for s in self.samples)

    def wait_completed(self, n: int, timeout_s: float = 300.0) -> None:
        """Block until `n` requests completed (e.g. a baseline before the first shift), or the load ended."""
        try:
            self.timeline.wait_for("completed", lambda done: done >= n, timeout_s=timeout_s)
        except TimeoutError:
            raise TimeoutError(f"only {self.completed()} of {n} requests completed within {timeout_s:.0f}s") from None
        except LookupError:
            pass  # the load ended (or crashed: stop() says why) before n completed

    def stop(self, timeout_s: float = 300.0) -> list[Sample]:
        """Stop sending; requests in flight finish (each bounded by the workload's timeout_s)."""
        self.mark("stop")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the load did not stop within {timeout_s:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"the load generator crashed: {self._error!r}") from self._error
        return self.samples

    def __enter__(self) -> TrafficLoad:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if not self._stop.is_set():
            self.stop()

    # ---- the loop --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            run_observed(lambda: asyncio.run(self._run()), {"completed": self.completed},
                         every_s=self.sample_every_s, timeline=self.timeline)
        except BaseException as e:  # surfaced by stop()
            self._error = e

    async def _run(self) -> None:
        wl = self.workload
        items = wl.items()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        counter = iter(range(self.max_requests))
        async with httpx.AsyncClient(
            base_url=self.url, headers=headers, trust_env=False,
            timeout=httpx.Timeout(wl.timeout_s, connect=min(10.0, wl.timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        ) as client:

            async def user() -> None:
                for i in counter:
                    if self._stop.is_set() or self.now() >= self.max_duration_s:
                        return
                    prompt, _, n_out = items[i % len(items)]
                    s = Sample(index=i, session=self.session_ids[i % len(self.session_ids)], start_s=self.now())
                    self.samples.append(s)
                    try:
                        await asyncio.wait_for(self._one(client, wl.body(prompt, n_out, None), s), wl.timeout_s)
                        s.status = "ok"
                    except Exception as e:
                        s.status, s.error = "error", f"{type(e).__name__}: {e}"[:500]
                    s.end_s = self.now()

            await asyncio.gather(*(user() for _ in range(self.concurrency)))

    async def _one(self, client: httpx.AsyncClient, body: dict[str, Any], s: Sample) -> None:
        path = self.workload.path
        async with client.stream("POST", path, json=body, headers={self.header: s.session}) as r:
            s.http_status = r.status_code
            s.version = r.headers.get(SERVED_BY_HEADER)
            epoch = r.headers.get(EPOCH_HEADER)
            s.epoch = int(epoch) if epoch and epoch.isdigit() else None
            if r.status_code >= 400:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                data = json.loads(await r.aread())
                if "error" in data:
                    raise RuntimeError(f"error in a 200 answer: {data['error']}")
                s.ttft_s = self.now() - s.start_s
                return
            async for obj in sse_objects(r):
                choices = obj.get("choices") or []
                text = choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))
                if text and math.isnan(s.ttft_s):
                    s.ttft_s = self.now() - s.start_s

    # ---- analysis --------------------------------------------------------------------------
    def finished(self) -> list[Sample]:
        return [s for s in self.samples if s.status in ("ok", "error")]

    def phases(self, labels: dict[str, tuple[str, str | None]]) -> dict[str, dict[str, Any]]:
        """Figures per phase; `labels` maps a phase name to (first marker, end marker or None = the end).
        A request belongs to the phase in which it started."""
        at = {m.name: m.t_s for m in self.markers}
        out = {}
        for phase, (a, b) in labels.items():
            t_a, t_b = at.get(a, math.inf), at.get(b, math.inf) if b else math.inf
            out[phase] = summarize([s for s in self.finished() if t_a <= s.start_s < t_b])
        return out

    def summary(self) -> dict[str, Any]:
        return summarize(self.finished())

    def stickiness_violations(self) -> list[dict[str, Any]]:
        return stickiness_violations(self.finished())

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.samples]

    def share_over_time(self, bin_s: float = 2.0) -> list[dict[str, Any]]:
        return share_over_time(self.finished(), bin_s)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if s.status == "ok"]
    by_version: dict[str, int] = {}
    for s in ok:
        by_version[s.version or "?"] = by_version.get(s.version or "?", 0) + 1
    ttft = [s.ttft_s * 1000 for s in ok if not math.isnan(s.ttft_s)]
    e2e = [(s.end_s - s.start_s) * 1000 for s in ok]
    errors = [s for s in samples if s.status == "error"]
    return {
        "requests": len(samples), "completed": len(ok), "failed": len(errors),
        "by_version": by_version,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "e2e_ms_p50": percentile(e2e, 50), "e2e_ms_p99": percentile(e2e, 99),
        "error_example": errors[0].error if errors else "",
    }


def stickiness_violations(samples: list[Sample]) -> list[dict[str, Any]]:
    """(session, epoch) pairs answered by more than one version: at fixed weights a session must
    always reach the same version."""
    seen: dict[tuple[str, int | None], set[str]] = {}
    for s in samples:
        if s.status == "ok" and s.version:
            seen.setdefault((s.session, s.epoch), set()).add(s.version)
    return [{"session": k[0], "epoch": k[1], "versions": sorted(v)} for k, v in seen.items() if len(v) > 1]


def share_over_time(samples: list[Sample], bin_s: float = 2.0) -> list[dict[str, Any]]:
    """Per time bin (by request start): how many completed requests each version served."""
    rows: dict[int, dict[str, int]] = {}
    for s in samples:
        if s.status == "ok" and s.version:
            b = int(s.start_s // bin_s)
            rows.setdefault(b, {})
            rows[b][s.version] = rows[b].get(s.version, 0) + 1
    return [{"t_s": b * bin_s, **counts} for b, counts in sorted(rows.items())]


def _configured_split(markers: list[Event]) -> list[tuple[float, float]]:
    """(time, canary percent) from the markers a Rollout left (`on_change=load.mark`): "50%", "promoted"..."""
    points = []
    for m in markers:
        label = m.name.split(":")[0].strip()
        if label.endswith("%") and label[:-1].replace(".", "", 1).isdigit():
            points.append((m.t_s, float(label[:-1])))
        elif label == "promoted":
            points.append((m.t_s, 100.0))
        elif label == "rolled back":
            points.append((m.t_s, 0.0))
    # Keep changes only (promote sends 100 % twice: before and after the old version is dropped).
    return [p for i, p in enumerate(points) if i == 0 or p[1] != points[i - 1][1]]


def plot_traffic_share(load: TrafficLoad, bin_s: float = 2.0, ax=None, versions: list[str] | None = None):
    """Stacked bars: the share of completed requests each version answered per `bin_s` (by request
    start). With `versions=[stable, canary]` the stable is at the bottom and the black step line is
    the configured split (100 - canary weight) as the router applied it, from the load's markers."""
    import matplotlib.pyplot as plt

    rows = load.share_over_time(bin_s)
    names = versions or sorted({k for r in rows for k in r if k != "t_s"})
    ax = ax or plt.subplots(figsize=(9, 3.5))[1]
    t = [r["t_s"] for r in rows]
    totals = [sum(r.get(n, 0) for n in names) or 1 for r in rows]
    bottom = [0.0] * len(rows)
    for n in names:
        share = [100.0 * r.get(n, 0) / tot for r, tot in zip(rows, totals)]
        ax.bar(t, share, width=bin_s, bottom=bottom, align="edge", label=n, alpha=0.85)
        bottom = [b + v for b, v in zip(bottom, share)]
    split = _configured_split(load.markers)
    if split and len(names) == 2:
        end = max([load.timeline.duration_s if load.timeline.ended else load.now()] + [m.t_s for m in load.markers])
        xs = [0.0] + [p[0] for p in split] + [end]
        ys = [100.0] + [100.0 - p[1] for p in split] + [100.0 - split[-1][1]]
        ax.step(xs, ys, where="post", color="k", lw=1.5, label="configured split")
    for i, (t_s, w) in enumerate(split):
        ax.axvline(t_s, color="k", ls=":", lw=0.8)
        ax.text(t_s, 102 + 7 * (i % 2), f"{w:g}%", fontsize=8, ha="center", va="bottom")
    ax.set_xlabel("time since load start (s)")
    ax.set_ylabel("share of requests (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("traffic share by version (labels: canary weight)", pad=26)
    return ax


__all__ = ["Sample", "TrafficLoad", "plot_traffic_share", "share_over_time", "stickiness_violations",
           "summarize"]
