"""Live tuning of a deployed app from a notebook: batching and Serve autoscaling, with ipywidgets.

`ServeTuner(app)` shows sliders for the knobs Serve can change without restarting replicas
(`user_config` batching, autoscaling bounds, the policy's target), an Apply button, a load button that drives
traffic in the background (`llmserve_nb.bench`'s closed loop), a status line plus a replica-count history
refreshed while load runs, and a load line that says how the load went, errors included. Everything the
buttons do is also a method (`set`, `apply`, `apply_batching`, `run_load`), so papermill runs the same code
headless.

A vLLM app (`EngineConfig(backend="vllm")`, Ray Serve LLM) has no live batching: vLLM schedules its batch
continuously inside the engine (up to `engine.max_num_seqs`, which is an engine argument: changing it reloads
the model), and there is no `/stats` batch histogram. For such an app the batching sliders are disabled
with a note saying so, `set()` of a batching knob is ignored with the same note, and the autoscaling
controls and the replica history work on its `LLMServer:<model_id>` deployment.

Autoscaling has two policies (`AutoscalingConfig.policy`): Serve's default keeps `target_ongoing_requests`
per replica; "llm" (`llmserve_nb.server.autoscaling_policy`) keeps requests waiting and p90 time to first token at their
targets. The targets of either change in place; switching the policy itself restarts the replicas (Serve
hashes the policy into the code version), which the status line says before Apply. vLLM apps have Serve's
default policy only.

The request router (`DeploymentConfig.request_router`) is shown; Apply declines a change of it with a note,
since Serve keeps a deployment's router through updates: it needs the app deleted and deployed again.
"""
from __future__ import annotations

import html
import threading
import time
from typing import Any, Callable, NamedTuple, get_args

import ipywidgets as W

from llmserve_nb.backends import backend_for
from llmserve_nb.bench import Timeline, run_observed
from llmserve_nb.cluster import AppHandle, ClusterError
from llmserve_nb.cluster.status import AppStatus
from llmserve_nb.config import AutoscalingConfig, ConfigError, DeploymentConfig
from llmserve_nb.experiments.autoscaling import load_and_watch

__all__ = ["ReplicaSample", "ServeTuner", "VLLM_BATCHING_NOTE"]

BATCHING_KNOBS = ("max_batch_size", "batch_wait_timeout_s")
VLLM_BATCHING_NOTE = (
    "Batching: not adjustable on a vLLM app. vLLM batches continuously inside its engine, up to "
    "engine.max_num_seqs={max_num_seqs} sequences (an engine argument: changing it reloads the model); "
    "Serve's live max_batch_size / batch_wait_timeout_s and the /stats batch histogram are features of the "
    "transformers engine. Autoscaling below works as usual (deployment {deployment})."
)


class ReplicaSample(NamedTuple):
    """One point of `ServeTuner.history`. `target` is Serve's decision (its target replica count), `running`
    what serves: their gap is a replica's start-up, tens of seconds for a vLLM engine on a busy CPU."""

    t: float
    running: int
    ongoing: int
    target: int | None


class ServeTuner:
    """Sliders + Apply for one app; `history` records `ReplicaSample`s (seconds, running and target
    replicas, ongoing load)."""

    def __init__(self, app: AppHandle, max_replicas_limit: int = 8):
        self.app = app
        cfg = app.config
        self.backend = backend_for(cfg)
        # The deployment whose replicas autoscale and whose count the history records.
        self.deployment = self.backend.model_deployment(cfg)
        self.live_batching = self.backend.live_batching
        self.batching_note = W.HTML()
        self.batching_note.add_class("llmserve-batching-note")
        if not self.live_batching:
            self.batching_note.value = (
                "<span style='color:#555'><i>"
                + html.escape(VLLM_BATCHING_NOTE.format(max_num_seqs=cfg.engine.max_num_seqs,
                                                        deployment=self.deployment))
                + "</i></span>"
            )
        auto = cfg.deployment.autoscaling or AutoscalingConfig(
            min_replicas=cfg.deployment.num_replicas, max_replicas=cfg.deployment.num_replicas
        )
        style = {"description_width": "170px"}
        layout = W.Layout(width="480px")
        self.max_batch_size = W.IntSlider(value=cfg.batching.max_batch_size, min=1, max=64, description="max_batch_size",
                                          style=style, layout=layout)
        self.batch_wait_timeout_s = W.FloatSlider(value=cfg.batching.batch_wait_timeout_s, min=0.0, max=0.5, step=0.005,
                                                  readout_format=".3f", description="batch_wait_timeout_s",
                                                  style=style, layout=layout)
        self.autoscaling = W.Checkbox(value=cfg.deployment.autoscaling is not None, description="Serve autoscaling",
                                      style=style, layout=layout)
        self.replicas = W.IntRangeSlider(value=(auto.min_replicas, auto.max_replicas), min=0, max=max_replicas_limit,
                                         description="min / max replicas", style=style, layout=layout)
        self.target_ongoing_requests = W.FloatSlider(value=auto.target_ongoing_requests, min=0.5, max=64, step=0.5,
                                                     description="target_ongoing_requests", style=style, layout=layout)
        self.policy = W.Dropdown(options=list(self.backend.autoscaling_policies),
                                 value=auto.policy, description="policy", style=style, layout=layout)
        self.target_ttft_s = W.FloatSlider(value=auto.target_ttft_s, min=0.1, max=30, step=0.1,
                                           description="target_ttft_s (llm)", style=style, layout=layout)
        self.target_waiting_requests = W.FloatSlider(value=auto.target_waiting_requests, min=0.5, max=64, step=0.5,
                                                     description="target_waiting (llm)", style=style, layout=layout)
        # How Serve picks a replica (DeploymentConfig.request_router, whose description says when each helps).
        self.request_router = W.Dropdown(options=list(get_args(DeploymentConfig.model_fields["request_router"].annotation)),
                                         value=cfg.deployment.request_router, description="request_router",
                                         style=style, layout=layout)
        self.apply_button = W.Button(description="Apply", button_style="primary", icon="check")
        self.load_concurrency = W.IntSlider(value=8, min=1, max=64, description="load: concurrent users", style=style,
                                            layout=layout)
        self.load_seconds = W.IntSlider(value=30, min=5, max=300, step=5, description="load: seconds", style=style,
                                        layout=layout)
        self.load_button = W.Button(description="Run load", icon="play")
        self.status = W.HTML()
        self.load_status = W.HTML()
        # Stable hooks for browser tests and custom CSS.
        self.status.add_class("llmserve-status")
        self.load_status.add_class("llmserve-load-status")
        self.max_batch_size.add_class("llmserve-max-batch-size")
        self.max_batch_size.disabled = self.batch_wait_timeout_s.disabled = not self.live_batching
        self.notes: list[str] = []  # what the tuner declined to do, and why (headless runs read it)
        self.history: list[ReplicaSample] = []
        # The last load run: llmserve_nb.bench's summary plus the policy it ran under, `scale_up_decided_s`
        # and `scale_up_s`.
        self.last_load: dict[str, Any] | None = None
        self._t0 = time.monotonic()
        self._load_thread: threading.Thread | None = None
        self.apply_button.on_click(lambda _: self._guarded(self.apply))
        self.load_button.on_click(lambda _: self._guarded(self.run_load))
        self.autoscaling.observe(lambda _: self._sync_enabled(), names="value")
        self.policy.observe(lambda _: self._sync_enabled(), names="value")
        self.request_router.observe(lambda _: self._sync_enabled(), names="value")
        self._sync_enabled()
        self.refresh()

    # ---- the knobs -----------------------------------------------------------------------
    def set(self, **values: Any) -> None:
        """Set widgets by name, e.g. `set(max_batch_size=4, replicas=(1, 2))`; unknown names are errors.
        On a vLLM app the batching knobs are ignored with a note (`notes`, the status line)."""
        for name, value in values.items():
            widget = getattr(self, name, None)
            if not isinstance(widget, W.ValueWidget):
                raise ValueError(f"no tuner control named {name!r}")
            if name in BATCHING_KNOBS and not self.live_batching:
                self._decline(f"{name}={value!r} ignored: vLLM batches continuously inside its engine "
                              f"(engine.max_num_seqs={self.app.config.engine.max_num_seqs})")
                continue
            widget.value = value

    def config(self):
        """The AppConfig the widgets currently describe (validated; errors name the field)."""
        lo, hi = self.replicas.value
        changes: dict[str, Any] = {}
        if self.live_batching:
            changes["batching.max_batch_size"] = self.max_batch_size.value
            changes["batching.batch_wait_timeout_s"] = round(self.batch_wait_timeout_s.value, 4)
        if self.autoscaling.value:
            base = self.app.config.deployment.autoscaling or AutoscalingConfig(min_replicas=lo, max_replicas=max(hi, 1))
            changes["deployment.autoscaling"] = base.model_copy(update={
                "min_replicas": lo, "max_replicas": max(hi, 1), "initial_replicas": None,
                "target_ongoing_requests": self.target_ongoing_requests.value, "policy": self.policy.value,
                "target_ttft_s": self.target_ttft_s.value, "target_waiting_requests": self.target_waiting_requests.value,
            }).model_dump()
        else:
            changes["deployment.autoscaling"] = None
            changes["deployment.num_replicas"] = max(hi, 1)
        changes["deployment.request_router"] = self.request_router.value
        if self.live_batching and self.app.config.deployment.max_ongoing_requests is not None:
            # An explicit cap below the new batch size would make the config invalid; raise it with the batch.
            changes["deployment.max_ongoing_requests"] = max(
                self.app.config.deployment.max_ongoing_requests, self.max_batch_size.value
            )
        return self.app.config.with_overrides(**changes)

    def apply(self) -> None:
        """Send the new config; Serve reconfigures replicas in place (batching, autoscaling, replica count)."""
        cfg = self.config()
        if (note := self._redeploy_needed(cfg.deployment.request_router)) is not None:
            self._decline(note)
            return
        self._show(f"applying {html.escape(_summary(cfg))} …")
        self.app.update(cfg, progress=None)
        self.refresh(note="applied")

    def apply_batching(self, **batching: Any) -> dict[str, Any]:
        """Set batching knobs (e.g. `max_batch_size=4`), apply, and report what the replicas run afterwards:
        `replica_kept` (the same replica ids before and after: reconfigured in place), `batching` (what the
        answering replica reports on /stats; None on a vLLM app) and `note` (why nothing changed, on vLLM).
        Never fails for a vLLM app: it says why there is no live batching there."""
        before = self.replica_ids()
        self.set(**batching)
        self.apply()
        after = self.replica_ids()
        if self.live_batching:
            return {"replica_kept": bool(before) and before == after, "batching": self.app.stats()["batching"],
                    "note": ""}
        note = VLLM_BATCHING_NOTE.format(max_num_seqs=self.app.config.engine.max_num_seqs, deployment=self.deployment)
        return {"replica_kept": bool(before) and before == after, "batching": None, "note": note}

    def replica_ids(self) -> list[str]:
        """Ids of the running replicas of the tuned deployment, from Serve's status (sorted)."""
        return self.app.status().deployment(self.deployment).running_ids

    # ---- load and status -----------------------------------------------------------------
    def run_load(self, concurrency: int | None = None, seconds: float | None = None, wait: bool = False,
                 max_tokens: int = 32) -> None:
        """Closed-loop streaming load for `seconds` in a background thread (so the widgets stay live),
        sampling Serve's status once a second (`experiments.autoscaling.load_and_watch`); the load line
        shows its outcome and errors. `last_load` gets the summary (TTFT percentiles included), the
        autoscaling policy in force, `scale_up_decided_s` and `scale_up_s` (`scale_up_times`)."""
        if self._load_thread is not None and self._load_thread.is_alive():
            raise RuntimeError("load is already running")
        concurrency = concurrency or self.load_concurrency.value
        seconds = seconds or self.load_seconds.value
        self._load_thread = threading.Thread(target=self._load, args=(concurrency, seconds, max_tokens), daemon=True)
        self._load_thread.start()
        if wait:
            self._load_thread.join()

    def wait_for_replicas(self, count: int, timeout_s: float = 120.0) -> int:
        """Sample once a second until `count` replicas run (or `timeout_s` passed); returns the last count
        seen. Raises the sampling error when Serve's status could not be read at all."""
        reached = threading.Event()
        record = self._recorder(lambda *_: 0)

        def check(timeline: Timeline) -> None:
            record(timeline)
            if self.history and self.history[-1].running == count:
                reached.set()

        first = len(self.history)
        timeline = run_observed(None, {"app": self.app.status}, every_s=1.0, duration_s=timeout_s, stop=reached,
                                on_sample=check)
        if len(self.history) == first:
            raise timeline.sample_errors["app"][-1][1]
        return self.history[-1].running

    def _load(self, concurrency: int, seconds: float, max_tokens: int) -> None:
        # A background thread's exception would only reach the kernel log: every failure ends in the load line.
        self.last_load = None
        try:
            self._show_load(f"load: {concurrency} users for {seconds:g}s …")
            # A closed loop keeps every user's request in flight until the run ends. By the sample's own time:
            # a sample taken just before the load ended is recorded after it.
            record = self._recorder(lambda timeline, t: 0 if timeline.load_ended_s is not None
                                    and timeline.load_ended_s <= t else concurrency)
            summary, _ = load_and_watch(self.app, concurrency=concurrency, seconds=seconds, max_tokens=max_tokens,
                                        on_sample=record)
            self.last_load = summary
        except Exception as e:  # noqa: BLE001 - shown to the user, who is not watching a log
            self._show_load(f"load failed: {type(e).__name__}: {e}", error=True)
            return
        note = (f"load done: {summary['completed']} requests in {summary['duration_s']:.0f}s, "
                f"{summary['output_tok_per_s']:.0f} tok/s")
        if summary["errors"]:
            self._show_load(f"{note}, {summary['errors']} errors (e.g. {summary['error_example'][:300]})", error=True)
        else:
            self._show_load(note)

    def _recorder(self, ongoing: Callable[[Timeline, float], int]) -> Callable[[Timeline], None]:
        """An `on_sample` for `run_observed`: each new "app" sample into `history` (on the tuner's clock)
        and the status line; the first failure to read Serve's status into the load line."""
        seen = {"samples": 0, "errors": 0}

        def record(timeline: Timeline) -> None:
            samples, errors = timeline.samples["app"], timeline.sample_errors.get("app", [])
            for t, st in samples[seen["samples"]:]:
                dep = st.deployment(self.deployment)
                self.history.append(ReplicaSample(round(timeline.t0 - self._t0 + t, 1), len(dep.running),
                                                  ongoing(timeline, t), dep.target_replicas))
                self.refresh(status=st)
            if errors and not seen["errors"]:
                self._show_load(f"replica sampling failed: {errors[0][1]}", error=True)
            seen.update(samples=len(samples), errors=len(errors))

        return record

    def refresh(self, note: str = "", status: AppStatus | None = None) -> None:
        try:
            st = status or self.app.status()
        except ClusterError as e:
            self._show(f"<span style='color:#b00'>{html.escape(str(e))}</span>")
            return
        dep = st.deployment(self.deployment)
        batching = (", ".join(f"{k}={v}" for k, v in (dep.user_config or {}).items()) if self.live_batching
                    else f"vLLM engine (max_num_seqs={self.app.config.engine.max_num_seqs})")
        self._show(
            f"<b>{html.escape(self.app.name)}</b>: {html.escape(st.status)} · replicas "
            f"{len(dep.running)} running / target {dep.target_replicas} · router "
            f"{html.escape(self.app.config.deployment.request_router)} · batching "
            + html.escape(batching)
            + (f" · <i>{html.escape(note)}</i>" if note else "")
        )

    def _show(self, text: str) -> None:
        self.status.value = text

    def _decline(self, note: str) -> None:
        self.notes.append(note)
        self._show(f"<i>{html.escape(note)}</i>")

    def _show_load(self, text: str, error: bool = False) -> None:
        style = " style='color:#b00'" if error else ""
        self.load_status.value = f"<span{style}>{html.escape(text)}</span>"

    def _guarded(self, action) -> None:
        # A click handler's exception would vanish into the kernel log: show it where the user looks.
        try:
            action()
        except (ClusterError, ConfigError, RuntimeError, ValueError) as e:
            self._show(f"<span style='color:#b00'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")

    def _sync_enabled(self) -> None:
        on = self.autoscaling.value
        llm = self.policy.value == "llm"
        self.policy.disabled = not on
        self.target_ongoing_requests.disabled = not on or llm
        self.target_ttft_s.disabled = self.target_waiting_requests.disabled = not on or not llm
        self.replicas.description = "min / max replicas" if on else "replicas (max used)"
        current = self.app.config.deployment.autoscaling
        if on and current is not None and current.policy != self.policy.value:
            self._show(f"<i>policy {html.escape(current.policy)} → {html.escape(self.policy.value)}: Apply restarts "
                       "the replicas (Serve hashes the policy into the code version); targets change in place</i>")
        if (note := self._redeploy_needed(self.request_router.value)) is not None:
            self._show(f"<i>{html.escape(note)}</i>")

    def _redeploy_needed(self, new: str) -> str | None:
        """Why Apply cannot send `cfg` as an update: Serve 2.60 makes a deployment's request router once per
        caller (its proxies, an ingress) and keeps it through updates, so a new router needs a fresh deploy."""
        old = self.app.config.deployment.request_router
        if old == new:
            return None
        return (f"request_router {old} → {new}: Serve keeps the router its proxies made through an update; "
                "delete the app (app.shutdown()) and deploy it again with this router. Apply does not send it")

    def replica_peaks(self) -> dict[str, int]:
        """The most replicas `history` saw running, and the highest target Serve set."""
        return {"max_replicas_seen": max((s.running for s in self.history), default=0),
                "max_target_seen": max((s.target or 0 for s in self.history), default=0)}

    # ---- display -------------------------------------------------------------------------
    def plot_history(self, ax=None):
        """Running and target replicas and ongoing requests over time."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 3))[1]
        if self.history:
            t, replicas, ongoing, target = zip(*self.history)
            ax.step(t, [float("nan") if n is None else n for n in target], where="post", label="target replicas (Serve)",
                    color="tab:gray", linestyle="--")
            ax.step(t, replicas, where="post", label="running replicas", color="tab:blue")
            ax.legend(loc="upper left", fontsize="small")
            ax2 = ax.twinx()
            ax2.plot(t, ongoing, color="tab:orange", alpha=0.6, label="requests in flight")
            ax2.set_ylabel("requests in flight")
        ax.set_xlabel("seconds")
        ax.set_ylabel("replicas")
        ax.set_title("Serve autoscaling under load")
        return ax

    @property
    def widget(self) -> W.Widget:
        return W.VBox([
            W.HTML("<b>Batching</b> (Serve user_config: replicas keep running)"),
            self.max_batch_size, self.batch_wait_timeout_s, self.batching_note,
            W.HTML("<b>Replicas</b>"), self.autoscaling, self.replicas, self.policy, self.target_ongoing_requests,
            self.target_ttft_s, self.target_waiting_requests, self.request_router,
            self.apply_button,
            W.HTML("<b>Load</b>"), self.load_concurrency, self.load_seconds, self.load_button, self.load_status,
            self.status,
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _summary(cfg) -> str:
    d = cfg.deployment
    a = d.autoscaling
    target = (f"llm policy @ ttft {a.target_ttft_s:g}s / waiting {a.target_waiting_requests:g}" if a and a.policy == "llm"
              else f"@ {a.target_ongoing_requests:g}" if a else "")
    reps = f"autoscaling {a.min_replicas}-{a.max_replicas} {target}" if a else f"{d.num_replicas} replicas"
    reps += f", router {d.request_router}"
    backend = backend_for(cfg)
    if not backend.live_batching:
        return f"{backend.name} engine batching, {reps}"
    return f"batch {cfg.batching.max_batch_size} / {cfg.batching.batch_wait_timeout_s:g}s, {reps}"
