"""From the search to a plan: replicas for a target rate, the autoscaling that holds it, the resources, and
the files to deploy it (an AppConfig YAML and its Kubernetes overlay, from the renderer `llmserve-nb k8s
render --config` uses). Each number comes with the reason for it in `CapacityPlan.rationale`.

The arithmetic, for a per-replica max rate λ (the highest rate one replica held under the SLO):
- replicas N = ceil(R / (λ (1 - headroom))) for a target rate R;
- each replica then serves R/N, and Little's law (L = λW) says it holds R/N x W requests at once, W being
  the mean e2e latency measured at that rate. That is `target_ongoing_requests`: at R, Serve's
  ongoing-requests autoscaler (desired = ceil(total ongoing / target)) asks for exactly N; from one
  replica, whose latency is higher under the whole load, it asks for at least N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llmserve_nb.config import AppConfig
from llmserve_nb.experiments.capacity_plan.search import Probe, SearchResult

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CapacityPlan", "e2e_at", "littles_law_target", "make_plan", "replicas_for"]

_PLAN_HEADER = "# AppConfig written by llmserve_nb.experiments.capacity_plan (notebook 07); load: AppConfig.from_file\n"


def replicas_for(target_rate: float, per_replica_rate: float, headroom: float) -> int:
    """ceil(target_rate / (per_replica_rate x (1 - headroom))): replicas that each stay `headroom` below
    the rate one replica held."""
    if not target_rate > 0 or not per_replica_rate > 0:
        raise ValueError(f"need target_rate > 0 and per_replica_rate > 0, got {target_rate} and {per_replica_rate}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a fraction in [0, 1), got {headroom}")
    # The rounding guard keeps an exact multiple (2.0000000001 from float division) at 2.
    return max(1, math.ceil(target_rate / (per_replica_rate * (1 - headroom)) - 1e-9))


def littles_law_target(rate_per_replica: float, e2e_s: float) -> float:
    """L = λW: the requests one replica holds at once when it serves `rate_per_replica` req/s, each for `e2e_s`."""
    if not rate_per_replica > 0 or not e2e_s > 0:
        raise ValueError(f"need a rate > 0 and an e2e latency > 0, got {rate_per_replica} and {e2e_s}")
    return rate_per_replica * e2e_s


def e2e_at(probes: Sequence[Probe], rate: float) -> float:
    """Mean e2e latency at `rate`, interpolated linearly between the probes that held around it; below
    the lowest such probe its latency (an unloaded replica's latency hardly changes), above the highest, its."""
    held = sorted((p.rate, p.e2e_mean_s) for p in probes if p.met and not math.isnan(p.e2e_mean_s))
    if not held:
        raise ValueError("no probe held the SLO: there is no latency to plan with")
    if rate <= held[0][0]:
        return held[0][1]
    for (r0, w0), (r1, w1) in zip(held, held[1:]):
        if r0 <= rate <= r1:
            return w0 if r1 == r0 else w0 + (w1 - w0) * (rate - r0) / (r1 - r0)
    return held[-1][1]


@dataclass
class CapacityPlan:
    """The plan: `config` is the AppConfig to deploy (best config + autoscaling); `rationale` explains it."""

    target_rate: float
    headroom: float
    per_replica_rate: float
    replicas: int
    rate_per_replica: float
    e2e_s: float
    target_ongoing_requests: float
    min_replicas: int
    max_replicas: int
    cpus: float
    gpus: float
    best: str
    slo: str
    config: AppConfig
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rationale(self) -> pd.DataFrame:
        """Each step of the plan: its value and why."""
        import pandas as pd

        return pd.DataFrame(self.steps, columns=["step", "value", "why"]).set_index("step")

    def config_yaml(self) -> str:
        """The AppConfig as YAML: fields that differ from the defaults, with the batching and autoscaling
        sections whole (the plan's numbers are there even where they happen to equal a default)."""
        import yaml

        data = self.config.model_dump(mode="json", exclude_defaults=True)
        data["batching"] = self.config.batching.model_dump(mode="json")
        auto = self.config.deployment.autoscaling
        assert auto is not None  # make_plan always sets it
        data.setdefault("deployment", {})["autoscaling"] = auto.model_dump(mode="json", exclude_none=True)
        return _PLAN_HEADER + yaml.safe_dump(data, sort_keys=False)

    def write(self, out_dir: str | Path, *, image: str | None = None, namespace: str = "llmserve",
              name: str | None = None) -> dict[str, Any]:
        """Write `app.yaml` (AppConfig.from_file reads it back), `rationale.csv` and the kustomize overlay
        `llmserve-nb k8s render --config app.yaml --out k8s` would write, under `out_dir/k8s/`. `image` defaults
        as the CLI's does (the GPU or CPU image, by num_gpus). Returns the paths written."""
        from llmserve_nb.k8s.options import CPU_CLUSTER, USER_HEADER, ClusterSpec
        from llmserve_nb.k8s.overlay import user_overlay, user_spec
        from llmserve_nb.k8s.tree import dump_files, write_files

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        app_yaml = out / "app.yaml"
        app_yaml.write_text(self.config_yaml())
        rationale = out / "rationale.csv"
        self.rationale.to_csv(rationale)
        k8s_dir = out / "k8s"
        image = image or (ClusterSpec().image if self.config.deployment.num_gpus else CPU_CLUSTER.image)
        spec = user_spec(self.config, image=image, namespace=namespace, name=name or self.config.name)
        manifests = write_files(k8s_dir, dump_files(user_overlay(self.config, spec, str(k8s_dir)), USER_HEADER))
        return {"app_yaml": app_yaml, "rationale": rationale, "k8s": k8s_dir, "manifests": manifests}

    def to_dict(self) -> dict[str, Any]:
        numbers = {k: getattr(self, k) for k in (
            "target_rate", "headroom", "per_replica_rate", "replicas", "rate_per_replica", "e2e_s",
            "target_ongoing_requests", "min_replicas", "max_replicas", "cpus", "gpus", "best", "slo")}
        return {**numbers, "config": self.config.model_dump(mode="json", exclude_defaults=True),
                "rationale": [{k: str(v) if k == "value" else v for k, v in s.items()} for s in self.steps]}


def make_plan(search: SearchResult, target_rate: float | None = None, *, headroom: float = 0.2,
              default_share: float = 1.0, min_replicas: int = 1,
              autoscaling: dict[str, Any] | None = None) -> CapacityPlan:
    """The plan for `target_rate` req/s from the best config of `search`.

    `target_rate` None plans for `default_share` x the rate one replica held: a target any cluster can verify
    that needs more than one replica once the headroom is above 1 - share (a demo's target). `min_replicas`
    is the off-peak floor; `autoscaling` holds more `AutoscalingConfig` fields (delays, look-back).
    """
    if min_replicas < 0:
        raise ValueError(f"min_replicas must be >= 0, got {min_replicas}")
    if not default_share > 0:
        raise ValueError(f"default_share must be > 0, got {default_share}")
    best = search.best
    lam = best.max_rate
    rate = lam * default_share if target_rate is None else target_rate
    n = replicas_for(rate, lam, headroom)
    per_replica = rate / n
    e2e = e2e_at(best.search.probes, per_replica)
    target = round(littles_law_target(per_replica, e2e), 2)
    low = min(min_replicas, n)
    config = best.config.with_overrides(**{"deployment.autoscaling": {
        **(autoscaling or {}), "min_replicas": low, "max_replicas": n, "target_ongoing_requests": target}})
    d = config.deployment
    wl = search.workload
    steps = [
        ("SLO", str(search.slo), "a request is good when it completed within every bound; a rate holds when at "
         "least the attainment share of the requests sent at it are good"),
        ("workload", f"{wl.input_tokens} tokens in, {wl.output_tokens} out, {wl.endpoint}",
         f"open loop, {search.window_s:g} s per probe (plus a drain for the last requests)"),
        ("configs tried", len(search.trials), "knobs Serve changes on a running replica (batching, "
         "max_ongoing_requests); engine.max_num_seqs is a build argument and would reload the model"),
        ("best config", best.label, "the highest rate held of all configs tried: "
         + ", ".join(f"{t.label}: {t.max_rate:.2f} ({t.search.stopped})" for t in search.trials)),
        ("per-replica max rate λ", round(lam, 3), f"req/s one replica held, from {len(best.search.probes)} probes "
         "(ramp, then bisection)"),
        ("target rate R", round(rate, 3), "given" if target_rate is not None
         else f"not given: {default_share:g} x the rate one replica held"),
        ("headroom h", headroom, "each replica stays this far below λ: bursts, noise, the search's resolution"),
        ("replicas N", n, f"ceil(R / (λ (1 - h))) = ceil({rate:.3f} / {lam * (1 - headroom):.3f})"),
        ("rate per replica R/N", round(per_replica, 3), "what each replica serves at the target"),
        ("e2e at R/N (W)", round(e2e, 3), "mean e2e seconds, interpolated between the probes that held"),
        ("target_ongoing_requests", target, "Little's law L = (R/N) x W: at R Serve's autoscaler asks for "
         "exactly N replicas, and from fewer (higher latency) for at least N"),
        ("min_replicas", low, "off-peak floor; 0 would make the first request after idle wait for a model load"),
        ("max_replicas", n, "N: the headroom is already in N"),
        ("max_ongoing_requests", config.max_ongoing_requests,
         "per-replica admission cap of the best config" + ("" if config.max_ongoing_requests > target else
                                                            "; WARNING: not above the target, raise it")),
        ("CPUs", f"{low * d.num_cpus:g} .. {n * d.num_cpus:g}", f"replicas x deployment.num_cpus ({d.num_cpus:g})"),
        ("GPUs", f"{low * d.num_gpus:g} .. {n * d.num_gpus:g}", f"replicas x deployment.num_gpus ({d.num_gpus:g})"),
    ]
    return CapacityPlan(
        target_rate=rate, headroom=headroom, per_replica_rate=lam, replicas=n, rate_per_replica=per_replica,
        e2e_s=e2e, target_ongoing_requests=target, min_replicas=low, max_replicas=n, cpus=n * d.num_cpus,
        gpus=n * d.num_gpus, best=best.label, slo=str(search.slo), config=config,
        steps=[{"step": s, "value": v, "why": w} for s, v, w in steps],
    )
