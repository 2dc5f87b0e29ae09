"""What notebook 07 shows: the form for the SLO and the target rate, the Pareto plot of the search, and the
verification's replica timeline. (The search's progress bar is tqdm's, in `search_configs`.)"""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from llmserve_nb.bench.slo import SLO
    from llmserve_nb.experiments.capacity_plan.plan import CapacityPlan
    from llmserve_nb.experiments.capacity_plan.search import SearchResult
    from llmserve_nb.experiments.capacity_plan.verify import Verification

__all__ = ["PlannerForm", "plot_pareto", "plot_replicas"]


class PlannerForm:
    """The planner's inputs as ipywidgets: the SLO (`SLO.parse` text, or its terms as a dict, checked as you
    type), the target rate (0 = none given: `make_plan`'s default), the headroom and the search budget. The
    properties read them back parsed, so the cells after the form run the same headless (papermill) as after
    editing it in JupyterLab."""

    def __init__(self, slo: str | Mapping[str, str], target_rate: float | None = None, headroom: float = 0.2,
                 budget_s: float = 120.0):
        import ipywidgets as W

        if not isinstance(slo, str):  # {"ttft": "1s", "e2e": "5s"}: a notebook parameter cannot hold "k=v" text
            slo = ",".join(f"{k}={v}" for k, v in slo.items())

        style = {"description_width": "9em"}
        self.slo_text = W.Text(value=slo, description="SLO", placeholder="ttft=1s,tpot=100ms,e2e=5s", style=style,
                               layout=W.Layout(width="32em"))
        self.rate = W.BoundedFloatText(value=target_rate or 0.0, min=0.0, max=1e6, step=0.5, style=style,
                                       description="target req/s",
                                       tooltip="0: none given (make_plan plans for a share of what one replica holds)")
        self.headroom_slider = W.FloatSlider(value=headroom, min=0.0, max=0.9, step=0.05, description="headroom",
                                             style=style)
        self.budget = W.BoundedIntText(value=int(budget_s), min=1, max=86400, description="search budget s",
                                       style=style)
        self.note = W.HTML()
        self.slo_text.observe(lambda _: self._check(), "value")
        self._check()
        self.widget = W.VBox([self.slo_text, self.rate, self.headroom_slider, self.budget, self.note])

    @property
    def slo(self) -> SLO:
        from llmserve_nb.bench import SLO

        return SLO.parse(self.slo_text.value)

    @property
    def target_rate(self) -> float | None:
        return self.rate.value or None

    @property
    def headroom(self) -> float:
        return self.headroom_slider.value

    @property
    def budget_s(self) -> float:
        return float(self.budget.value)

    def _check(self) -> None:
        try:
            text = f"SLO: {html.escape(str(self.slo))}"
            color = "#555"
        except ValueError as e:
            text, color = html.escape(str(e)), "#b00"
        self.note.value = f"<span style='color:{color}'>{text}</span>"

    def values(self) -> dict[str, Any]:
        return {"slo": str(self.slo), "target_rate": self.target_rate, "headroom": self.headroom,
                "budget_s": self.budget_s}

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def plot_pareto(search: SearchResult, ax=None):
    """Goodput (good requests per second of offered load) against the offered rate, per config: on the
    diagonal every request was good; a filled marker held the SLO, a cross did not."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 4))[1]
    top = max((p.rate for t in search.trials for p in t.search.probes), default=1.0)
    ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="all good")
    for trial in search.trials:
        probes = sorted(trial.search.probes, key=lambda p: p.rate)
        line, = ax.plot([p.rate for p in probes], [p.goodput for p in probes], alpha=0.6,
                        label=f"{trial.label}: {trial.max_rate:.2f} req/s ({trial.search.stopped})")
        for p in probes:
            ax.plot(p.rate, p.goodput, "o" if p.met else "x", color=line.get_color(), markersize=7)
    try:
        ax.axvline(search.best.max_rate, color="black", linestyle="--", linewidth=0.8)
    except ValueError:  # no config held any rate: nothing to mark
        pass
    ax.set_xlabel("offered rate (req/s, open loop)")
    ax.set_ylabel("goodput (good req/s)")
    ax.set_title(f"one replica under {search.slo}")
    ax.legend(fontsize=8, loc="upper left")
    return ax


def plot_replicas(verification: Verification, plan: CapacityPlan, ax=None):
    """Running and target replicas during the verification, against the planned count; shaded, the window
    whose requests the SLO is judged on."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3))[1]
    rows = verification.timeline
    t = [r["t_s"] for r in rows]
    ax.step(t, [r["running"] for r in rows], where="post", label="running replicas", color="tab:blue")
    ax.step(t, [r["target"] or 0 for r in rows], where="post", label="Serve's target", color="tab:blue", linestyle=":")
    ax.axhline(plan.replicas, color="tab:green", linestyle="--", label=f"planned ({plan.replicas})")
    s = verification.summary
    ax.axvspan(s["window_start_s"], s["duration_s"], color="tab:green", alpha=0.08, label="SLO judged")
    ax.set_ylim(0, plan.max_replicas + 1)
    ax.set_xlabel("seconds into the verification load")
    ax.set_ylabel("replicas")
    ax.set_title(f"{s['rate']:.2f} req/s: {s['attainment']:.1%} of the judged requests good "
                 f"({s['whole_run_attainment']:.1%} of all)")
    ax.legend(fontsize=8, loc="lower right")
    return ax
