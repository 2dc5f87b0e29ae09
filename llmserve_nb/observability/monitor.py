"""A live view of a serving app for notebooks: one chart, updated in place while load runs.

    with LiveMonitor(application="llm"):          # or LiveMonitor(prometheus_url=..., ...)
        run_benchmark(...)                        # the chart updates every interval_s meanwhile

Figures are those of `llmserve_nb.observability.promql.PROMQL`: replicas target vs running, requests running and
waiting, generation tok/s, TTFT p50/p99 and TPOT p50, errors/s. With a Prometheus URL they are those
queries; without one they are computed the same way from Ray's own metrics endpoints (every node's
export port, from the service-discovery file of the Ray this kernel runs), from two scrapes `window_s`
apart, as Prometheus' `rate` and `histogram_quantile` would.

A background thread redraws the chart into an ipywidgets `Output`. It stops on `stop()`, at the end of a
`with` block, or by itself after `duration_s`. `stop()` from a cell (the `with` block's end included)
also replaces the live widget by the final chart as a plain image, so a headless run (papermill,
nbconvert) keeps the chart in the notebook's outputs.
"""
from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import httpx

from llmserve_nb.config import DEPLOYMENT_NAME
from llmserve_nb.observability.promql import PREFIX, queries

__all__ = ["LiveMonitor", "MonitorError"]

HTTP_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
SD_FILE = "prom_metrics_service_discovery.json"

# (panel title, [(figure, legend label, line style)])
PANELS = [
    ("replicas", [("replicas_target", "target", "--"), ("replicas_running", "running", "-")]),
    ("requests", [("requests_running", "running", "-"), ("requests_waiting", "waiting", "-")]),
    ("generation tok/s", [("generation_tokens_per_s", "tok/s", "-")]),
    ("latency (s)", [("ttft_p50_s", "TTFT p50", "-"), ("ttft_p99_s", "TTFT p99", "--"), ("tpot_p50_s", "TPOT p50", ":")]),
    ("errors/s (5xx)", [("errors_per_s", "errors/s", "-")]),
]
FIGURES = [key for _, lines in PANELS for key, _, _ in lines]


class MonitorError(RuntimeError):
    """The monitor has no data source it can read."""


# ---- sources ------------------------------------------------------------------------------------
class _PrometheusSource:
    """The PromQL of `metrics.queries`, evaluated by a Prometheus server."""

    def __init__(self, url: str, window_s: float, application: str | None):
        self.url = url.rstrip("/")
        selector = f'application="{application}"' if application else ""
        all_queries = queries(window=f"{int(window_s)}s", selector=selector)
        self.queries = {k: all_queries[k] for k in FIGURES}
        self._http = httpx.Client(timeout=HTTP_TIMEOUT)

    def sample(self) -> dict[str, float]:
        out = {}
        for key, promql in self.queries.items():
            try:
                r = self._http.get(f"{self.url}/api/v1/query", params={"query": promql})
            except httpx.TransportError as e:
                raise MonitorError(f"Prometheus at {self.url} did not answer: {type(e).__name__}: {e}") from None
            body = r.json() if "json" in r.headers.get("content-type", "") else {}
            if r.status_code != 200 or body.get("status") != "success":
                raise MonitorError(f"Prometheus query {key} -> HTTP {r.status_code}: {body.get('error') or r.text[:300]}")
            result = body["data"]["result"]
            out[key] = float(result[0]["value"][1]) if result else math.nan
        return out

    def close(self) -> None:
        self._http.close()


_Series = dict[frozenset, float]  # labels -> value, for one sample name


class _ScrapeSource:
    """The same figures from Ray's metrics endpoints, scraped directly (no Prometheus needed)."""

    WANTED = (PREFIX, "ray_serve_autoscaling_target_replicas", "ray_serve_deployment_replica_healthy")

    def __init__(self, targets: Callable[[], list[str]], window_s: float, application: str | None):
        self.targets = targets
        self.window_s = window_s
        self.application = application
        self._snapshots: deque[tuple[float, dict[str, _Series]]] = deque()
        self._http = httpx.Client(timeout=HTTP_TIMEOUT)

    def _scrape(self) -> dict[str, _Series]:
        from prometheus_client.parser import text_string_to_metric_families

        lines: list[str] = []
        errors = []
        targets = self.targets()
        for target in targets:
            url = target if "://" in target else f"http://{target}/metrics"
            try:
                r = self._http.get(url)
                r.raise_for_status()
            except httpx.HTTPError as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
                continue
            # Ray's endpoints carry hundreds of metric families: parse only ours and Serve's replica counts.
            lines += [ln for ln in r.text.splitlines()
                      if ln.startswith(self.WANTED) or (ln.startswith("#") and any(w in ln for w in self.WANTED))]
        if targets and len(errors) == len(targets):
            raise MonitorError("no Ray metrics endpoint answered: " + "; ".join(errors))
        samples: dict[str, _Series] = {}
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            for s in family.samples:
                if self.application and s.labels.get("application") not in (None, self.application):
                    continue
                series = samples.setdefault(s.name, {})
                key = frozenset(s.labels.items())
                series[key] = series.get(key, 0.0) + s.value
        return samples

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        snap = self._scrape()
        self._snapshots.append((now, snap))
        # Keep the newest snapshot at least window_s old as the baseline, like a rate over [window].
        while len(self._snapshots) > 2 and now - self._snapshots[1][0] >= self.window_s:
            self._snapshots.popleft()
        t0, base = self._snapshots[0]
        dt = now - t0

        def gauge(name: str, deployment: bool = False) -> float:
            series = snap.get(name, {})
            if deployment:
                series = {k: v for k, v in series.items() if ("deployment", DEPLOYMENT_NAME) in k}
            return sum(series.values()) if series else math.nan

        def increase(name: str, where: Callable[[dict], bool] = lambda labels: True) -> dict[frozenset, float]:
            before = base.get(name, {})
            out = {}
            for key, v in snap.get(name, {}).items():
                if where(dict(key)):
                    v0 = before.get(key, 0.0)
                    out[key] = v - v0 if v >= v0 else v  # a restarted replica's counter starts again at 0
            return out

        def rate(name: str, where: Callable[[dict], bool] = lambda labels: True) -> float:
            return sum(increase(name, where).values()) / dt if dt > 0 else math.nan

        def quantile(q: float, name: str) -> float:
            by_le: dict[float, float] = {}
            for key, inc in increase(f"{PREFIX}{name}_bucket").items():
                le = float(dict(key)["le"])
                by_le[le] = by_le.get(le, 0.0) + inc
            return _histogram_quantile(q, sorted(by_le.items()))

        http = f"{PREFIX}http_requests_total"
        errors = rate(http, lambda labels: labels.get("status", "").startswith("5")) if http in snap else 0.0
        return {
            "replicas_target": gauge("ray_serve_autoscaling_target_replicas", deployment=True),
            "replicas_running": gauge("ray_serve_deployment_replica_healthy", deployment=True),
            "requests_running": gauge(f"{PREFIX}num_requests_running"),
            "requests_waiting": gauge(f"{PREFIX}num_requests_waiting"),
            "generation_tokens_per_s": rate(f"{PREFIX}generation_tokens_total"),
            "ttft_p50_s": quantile(0.5, "time_to_first_token_seconds"),
            "ttft_p99_s": quantile(0.99, "time_to_first_token_seconds"),
            "tpot_p50_s": quantile(0.5, "request_time_per_output_token_seconds"),
            "errors_per_s": errors,
        }

    def close(self) -> None:
        self._http.close()


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs sorted by bound."""
    if not buckets or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == math.inf:
                return lower  # Prometheus answers the highest finite bound
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return math.nan


def _local_ray_targets() -> Callable[[], list[str]]:
    """Every node's metrics export address, read from the service-discovery file of this kernel's Ray."""
    import ray

    if not ray.is_initialized():
        raise MonitorError(
            "no data source: this kernel is not connected to a Ray it started (connect() with no address), so "
            "give prometheus_url= (a Prometheus that scrapes the cluster) or metrics_urls= (Ray metrics endpoints)"
        )
    # The session dir's file, not /tmp/ray's symlink, which points at whichever Ray on the machine started last.
    path = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / SD_FILE

    def read() -> list[str]:
        try:
            groups = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # Ray rewrites it every few seconds, atomically; absent at first
            raise MonitorError(f"cannot read Ray's service-discovery file {path}: {e}") from None
        return [t for g in groups for t in g.get("targets", [])]

    return read


# ---- the monitor --------------------------------------------------------------------------------
class LiveMonitor:
    """One chart of the serving figures, redrawn every `interval_s` from a background thread.

    - `prometheus_url`: evaluate `metrics.PROMQL` there; else scrape Ray's endpoints: `metrics_urls`,
      or by default every node of the Ray this kernel started (`connect()` with no address).
    - `application`: only this Serve application's series (all of them when None).
    - `window_s`: the rate/quantile window; Ray reports metrics every 10 s, so keep it >= 30.
    - `duration_s`: the thread stops by itself after this long, whatever happens in the notebook.
    """

    def __init__(
        self,
        prometheus_url: str | None = None,
        *,
        application: str | None = None,
        metrics_urls: list[str] | None = None,
        interval_s: float = 2.0,
        window_s: float = 30.0,
        duration_s: float = 600.0,
        title: str | None = None,
    ):
        if interval_s <= 0 or duration_s <= 0 or window_s <= 0:
            raise ValueError("interval_s, window_s and duration_s must be > 0")
        if prometheus_url:
            self._source: Any = _PrometheusSource(prometheus_url, window_s, application)
            where = f"Prometheus {prometheus_url}"
        else:
            urls = list(metrics_urls or [])
            targets = (lambda: urls) if urls else _local_ray_targets()
            self._source = _ScrapeSource(targets, window_s, application)
            where = "Ray metrics endpoints"
        self.title = title or f"{application or 'all applications'} · {where}"
        self.interval_s = interval_s
        self.duration_s = duration_s
        self.history: list[tuple[float, dict[str, float]]] = []  # (seconds since start, figures)
        self.updates = 0  # charts drawn
        self.last_error: str | None = None
        self.png: bytes | None = None  # the latest chart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._widget: Any = None
        self._final_shown = False

    @classmethod
    def for_app(cls, app: Any, prometheus_url: str | None = None, **options: Any) -> LiveMonitor:
        """A monitor of one deployed app (an `AppHandle`): its application's series, from `prometheus_url`
        when given, else from the metrics endpoints of every node of the cluster the app runs on."""
        if prometheus_url:
            return cls(prometheus_url, application=app.name, **options)
        return cls(application=app.name, metrics_urls=app.cluster.metrics_urls(), **options)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LiveMonitor:
        if self._thread is not None:
            raise RuntimeError("this LiveMonitor was already started; make a new one")
        import ipywidgets

        self._widget = ipywidgets.Output()
        if _in_ipython():
            from IPython.display import display

            display(self._widget)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="llmserve-live-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread and wait for it; from a cell, leave the final chart there as an image."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the monitor thread did not stop within {timeout_s:.0f}s")
        self._source.close()
        if self.png is None and self._widget is not None:
            self._draw()  # stopped before the thread drew anything: still leave a (blank) chart
        if self.png is not None and not self._final_shown and _in_ipython():
            from IPython.display import Image, display

            self._final_shown = True
            # Live, the widget's view goes and the image takes its place; headless (where widget
            # views are not kept) the image is what stays in the notebook.
            self._widget.close()
            display(Image(data=self.png, format="png"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> LiveMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        deadline = self._t0 + self.duration_s
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                figures = self._source.sample()
                self.last_error = None
            except Exception as e:  # a failed scrape is shown on the chart; the next one may work
                figures = {}
                self.last_error = f"{type(e).__name__}: {e}"
            if figures:
                self.history.append((t - self._t0, figures))
            self._draw()
            if t >= deadline:
                break
            self._stop.wait(max(0.0, min(self.interval_s - (time.monotonic() - t), deadline - time.monotonic())))

    def _draw(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # A Figure of its own, not pyplot: no global state shared with the notebook's plots.
        fig = Figure(figsize=(15, 3.0), dpi=72, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(PANELS))
        ts = [t for t, _ in self.history]
        for ax, (panel, lines) in zip(axes, PANELS):
            for key, label, style in lines:
                ys = [f.get(key, math.nan) for _, f in self.history]
                ax.plot(ts, ys, style, label=label)
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel("s", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.set_ylim(bottom=0)
            if len(lines) > 1:
                ax.legend(fontsize=7, loc="upper left")
        status = f"error: {self.last_error[:150]}" if self.last_error else f"{len(self.history)} samples"
        fig.suptitle(f"{self.title} — {status}", fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.png = buf.getvalue()
        self.updates += 1
        latest = self.history[-1][1] if self.history else {}
        summary = ", ".join(f"{k}={v:.3g}" for k, v in latest.items()) or status
        self._widget.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(self.png).decode(), "text/plain": summary},
            "metadata": {},
        },)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None
